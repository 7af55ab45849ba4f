"""What every route shares: the database session, who is asking, CSRF, roles, templates.

Each router declares who may use it with `require_roles(...)` (or `public`). The check
also enforces CSRF on state-changing requests made with a session cookie, so a route
cannot be protected by one and forget the other.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from sqlalchemy.orm import Session
from starlette.responses import HTMLResponse, Response

from app import __version__
from app.auth import service as auth_service
from app.auth.models import Role, User, UserSession
from app.config import PROJECT_ROOT, Settings
from app.db import MAX_ID

ROOT = PROJECT_ROOT
SESSION_COOKIE = "prefloop_session"
LOGIN_CSRF_COOKIE = "prefloop_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# A row id in a route's path: one no database could hold is refused (422), not sent to it.
RowId = Annotated[int, Path(ge=0, le=MAX_ID)]

templates = Jinja2Templates(directory=ROOT / "templates")
templates.env.globals["app_version"] = __version__

_CODE_SPAN = re.compile(r"`([^`\n]+)`")


def inline_code(text: str) -> Markup:
    """Text with its `backtick` spans as <code>. Everything is escaped first (a message may
    echo user input), so the only markup that can come out is <code> itself."""
    return Markup(_CODE_SPAN.sub(r"<code>\1</code>", str(escape(text))))  # noqa: S704


templates.env.filters["inline_code"] = inline_code


class NotAuthenticated(Exception):
    """No valid session or token: browsers go to the login page, API clients get 401."""


# These two are `async def` although they do no I/O: FastAPI runs a plain `def` dependency on
# a worker thread, and each such hop costs more than the work.


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> AsyncIterator[Session]:
    """One session per request. Views that change data call `db.commit()` before answering,
    so a response is only sent for work that is durable. Opening a session takes no
    connection, and by the time it closes the view has committed: neither blocks the loop."""
    with request.app.state.db.session() as session:
        yield session


DbSession = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


@dataclass(frozen=True)
class Viewer:
    """What pages need to know about the caller, copied out of the ORM when the request
    starts, so an error page can still be drawn after the request's transaction rolled back."""

    id: int
    username: str
    display_name: str
    role: Role
    session_id: str | None  # None when the request came with an API token
    csrf_token: str | None


@dataclass
class Principal:
    user: User  # attached to the request's database session
    viewer: Viewer

    @property
    def via_token(self) -> bool:
        return self.viewer.session_id is None

    @classmethod
    def of(cls, user: User, session: UserSession | None) -> Principal:
        viewer = Viewer(
            id=user.id,
            username=user.username,
            display_name=user.display_name,
            role=user.role,
            session_id=session.id if session else None,
            csrf_token=session.csrf_token if session else None,
        )
        return cls(user=user, viewer=viewer)


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def get_principal(request: Request, db: DbSession, settings: SettingsDep) -> Principal | None:
    """Who is asking: a bearer token wins over a cookie; None for anonymous requests."""
    if hasattr(request.state, "principal"):
        return request.state.principal
    principal: Principal | None = None
    bearer = _bearer_token(request)
    if bearer is not None:
        user = auth_service.resolve_api_token(db, bearer)
        principal = Principal.of(user, None) if user else None
    elif token := request.cookies.get(SESSION_COOKIE):
        row = auth_service.resolve_session(db, settings, token)
        principal = Principal.of(row.user, row) if row else None
    # End this transaction now: it persists a session touch (or expiry), and it gives the
    # connection back before the route runs. The route runs on another pool thread; holding a
    # connection (or SQLite's write lock) across that hop deadlocks once every thread waits
    # for a connection that a request waiting for a thread holds.
    db.commit()
    request.state.principal = principal
    return principal


OptionalPrincipal = Annotated[Principal | None, Depends(get_principal)]


def login_csrf_token(secret_key: str, cookie_value: str) -> str:
    """The token a pre-login form carries: an HMAC of its cookie (signed double-submit)."""
    return hmac.new(secret_key.encode(), cookie_value.encode(), hashlib.sha256).hexdigest()


def expected_csrf_token(
    request: Request, principal: Principal | None, settings: Settings
) -> str | None:
    if principal is not None and principal.viewer.csrf_token is not None:
        return principal.viewer.csrf_token
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE)
    return login_csrf_token(settings.secret_key, cookie) if cookie else None


async def check_csrf(request: Request, principal: Principal | None, settings: Settings) -> None:
    """Refuse a state-changing browser request that is cross-site or lacks the right token."""
    if request.method in SAFE_METHODS or (principal is not None and principal.via_token):
        return  # bearer-token calls are not sent by browsers on their own, so need no token
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise HTTPException(403, "Cross-site request refused.")
    expected = expected_csrf_token(request, principal, settings)
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        # Starlette caches the parsed form on the request, so the route can still read it.
        sent = (await request.form()).get(CSRF_FIELD)
    if (
        not expected
        or not isinstance(sent, str)
        or not secrets.compare_digest(sent.encode(), expected.encode())  # bytes: any input is safe
    ):
        raise HTTPException(
            403,
            "This form has expired or did not come from prefloop. Reload the page and try again.",
        )


def require_roles(*roles: Role) -> Callable[..., Any]:
    """A dependency: the caller must be signed in with one of `roles`; CSRF is checked too."""

    async def dependency(
        request: Request, principal: OptionalPrincipal, settings: SettingsDep
    ) -> Principal:
        if principal is None:
            raise NotAuthenticated()
        await check_csrf(request, principal, settings)
        if principal.user.role not in roles:
            raise HTTPException(403, "Your role does not give access to this page.")
        return principal

    return dependency


ANY_ROLE = tuple(Role)


async def public(request: Request, principal: OptionalPrincipal, settings: SettingsDep) -> None:
    """For routes open to everyone; state-changing ones still need a CSRF token."""
    await check_csrf(request, principal, settings)


async def current_principal(request: Request) -> Principal:
    """The principal a role check already resolved (use on routers guarded by require_roles)."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        raise NotAuthenticated()
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


async def current_user(principal: CurrentPrincipal) -> User:
    return principal.user


CurrentUser = Annotated[User, Depends(current_user)]


# --- navigation and rendering -----------------------------------------------------------------

NAVIGATION: dict[Role, list[tuple[str, str]]] = {
    Role.labeler: [("Labeling", "/label"), ("My judgments", "/label/history")],
    Role.admin: [
        ("Admin", "/admin"),
        ("Campaigns", "/admin/campaigns"),
        ("Imports", "/admin/imports"),
        ("Users", "/admin/users"),
        ("Research", "/research"),
        ("Jobs", "/jobs"),
        ("Models", "/models"),
        ("Policies", "/policies"),
        ("API tokens", "/tokens"),
    ],
    Role.researcher: [
        ("Research", "/research"),
        ("Jobs", "/jobs"),
        ("Models", "/models"),
        ("Policies", "/policies"),
        ("API tokens", "/tokens"),
    ],
}


def home_path(role: Role) -> str:
    return NAVIGATION[role][0][1]


def flash(db: Session, principal: Principal, text: str, level: str = "success") -> None:
    """Queue a message for the next page this browser renders (part of the caller's transaction)."""
    if principal.viewer.session_id is not None and (
        row := db.get(UserSession, principal.viewer.session_id)
    ):
        row.flashes = [*row.flashes, {"level": level, "text": text}]
        db.flush()


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
    db: Session | None = None,
) -> Response:
    """Render a page with the layout's context: user, navigation, CSRF token, flashes.

    Flashes are popped only when `db` is given, i.e. by views that commit afterwards.
    """
    principal: Principal | None = getattr(request.state, "principal", None)
    viewer = principal.viewer if principal else None
    flashes: list[dict[str, str]] = []
    if db is not None and viewer is not None and viewer.session_id is not None:
        row = db.get(UserSession, viewer.session_id)
        if row is not None and row.flashes:
            flashes, row.flashes = list(row.flashes), []
            db.commit()
    page_context = {**_layout_context(request, viewer), "flashes": flashes, **(context or {})}
    return templates.TemplateResponse(request, template, page_context, status_code=status_code)


def render_block(
    request: Request, template: str, block: str, context: dict[str, Any], *, status_code: int = 200
) -> HTMLResponse:
    """Render one `{% block %}` of a page: the fragment an htmx request swaps in.

    The same template serves the full page and its parts, so they cannot drift apart
    (the "template fragments" pattern). The page's top level does not run: a block that
    uses macros imports them itself.
    """
    principal: Principal | None = getattr(request.state, "principal", None)
    page = templates.env.get_template(template)
    jinja_context = page.new_context(
        {
            **_layout_context(request, principal.viewer if principal else None),
            "request": request,
            **context,
        }
    )
    return HTMLResponse("".join(page.blocks[block](jinja_context)), status_code=status_code)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def _layout_context(request: Request, viewer: Viewer | None) -> dict[str, Any]:
    return {
        "current_user": viewer,
        "navigation": NAVIGATION.get(viewer.role, []) if viewer else [],
        "csrf_token": viewer.csrf_token if viewer else None,
        "is_htmx": is_htmx(request),
    }
