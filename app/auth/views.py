"""Login, logout and the API-token page."""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from starlette.responses import RedirectResponse, Response

from app.auth import service
from app.auth.models import Role, User
from app.auth.passwords import PasswordPolicyError
from app.web import (
    ANY_ROLE,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    CurrentPrincipal,
    CurrentUser,
    DbSession,
    OptionalPrincipal,
    RowId,
    SettingsDep,
    client_ip,
    flash,
    home_path,
    is_htmx,
    login_csrf_token,
    public,
    render,
    require_roles,
)

public_router = APIRouter(dependencies=[Depends(public)])
session_router = APIRouter(dependencies=[Depends(require_roles(*ANY_ROLE))])
tokens_router = APIRouter(dependencies=[Depends(require_roles(Role.admin, Role.researcher))])


def _safe_next(next_url: str | None) -> str | None:
    """Only same-site paths: an open redirect after login would be a phishing aid."""
    if (
        not next_url
        or not next_url.startswith("/")
        or next_url.startswith("//")
        or "\\" in next_url
    ):
        return None
    return next_url if not urlsplit(next_url).netloc else None


def _login_page(
    request: Request,
    settings: SettingsDep,
    *,
    error: str | None = None,
    status_code: int = 200,
    username: str = "",
    next_url: str | None = None,
) -> Response:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    response = render(
        request,
        "auth/login.html",
        {
            "error": error,
            "username": username,
            "next": _safe_next(next_url) or "",
            "login_csrf": login_csrf_token(settings.secret_key, cookie),
        },
        status_code=status_code,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        cookie,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
        max_age=12 * 3600,
    )
    return response


def _start_session(
    request: Request, response: Response, db: DbSession, settings: SettingsDep, user: User
) -> None:
    """Create a session row, commit it, and hand its token to the browser as a cookie."""
    token = service.create_session(
        db, settings, user, ip=client_ip(request), user_agent=request.headers.get("user-agent")
    )
    db.commit()
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
        max_age=settings.session_max_hours * 3600,
    )


@public_router.get("/login")
def login_form(
    request: Request, principal: OptionalPrincipal, settings: SettingsDep, next: str | None = None
) -> Response:
    """The login page (signed-in users go straight home)."""
    if principal is not None and not principal.via_token:
        return RedirectResponse(_safe_next(next) or home_path(principal.user.role), status_code=303)
    return _login_page(request, settings, next_url=next)


@public_router.post("/login")
def login(
    request: Request,
    db: DbSession,
    settings: SettingsDep,
    username: Annotated[str, Form(max_length=256)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    next: Annotated[str, Form(max_length=2048)] = "",
) -> Response:
    """Check the password, start a fresh session, and go to the role's home page."""
    try:
        user = service.authenticate(
            db, settings, username=username, password=password, ip=client_ip(request)
        )
    except service.ThrottledError as exc:
        db.commit()  # the attempt is logged even though it is refused
        response = _login_page(
            request, settings, error=str(exc), status_code=429, username=username, next_url=next
        )
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except service.AuthError as exc:
        db.commit()
        return _login_page(
            request, settings, error=str(exc), status_code=401, username=username, next_url=next
        )
    # A new session id at every login: a planted cookie cannot be promoted (session fixation).
    if old := request.cookies.get(SESSION_COOKIE):
        service.end_session(db, old)
    response = RedirectResponse(_safe_next(next) or home_path(user.role), status_code=303)
    _start_session(request, response, db, settings, user)
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


@session_router.post("/logout")
def logout(request: Request, db: DbSession, principal: CurrentPrincipal) -> Response:
    """End this browser's session (the row is deleted, so the cookie is dead everywhere)."""
    if principal.via_token:
        raise HTTPException(400, "API tokens are revoked on the tokens page, not logged out.")
    service.end_session(db, request.cookies.get(SESSION_COOKIE, ""))
    db.commit()
    response = RedirectResponse("/login?signed_out=1", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    if is_htmx(request):
        response.headers["HX-Redirect"] = "/login?signed_out=1"
    return response


@session_router.get("/")
def index(principal: CurrentPrincipal) -> Response:
    """Send each role to its own home page."""
    return RedirectResponse(home_path(principal.user.role), status_code=303)


@tokens_router.get("/tokens")
def tokens_page(request: Request, db: DbSession, user: CurrentUser) -> Response:
    """The user's API tokens: name, prefix, last use; create and revoke."""
    return render(request, "auth/tokens.html", {"tokens": service.list_api_tokens(db, user)}, db=db)


@tokens_router.post("/tokens")
def create_token(
    request: Request,
    db: DbSession,
    user: CurrentUser,
    name: Annotated[str, Form(max_length=128)] = "",
    expires_in_days: Annotated[int | None, Form(ge=1, le=3650)] = None,
) -> Response:
    """Create a token and show its secret this one time."""
    new = service.create_api_token(db, user, name=name, expires_in_days=expires_in_days)
    db.commit()
    return render(
        request,
        "auth/tokens.html",
        {
            "tokens": service.list_api_tokens(db, user),
            "new_secret": new.secret,
            "new_token": new.token,
        },
    )


@tokens_router.post("/tokens/{token_id}/revoke")
def revoke_token(
    request: Request, db: DbSession, principal: CurrentPrincipal, token_id: RowId
) -> Response:
    """Revoke one of your tokens; scripts using it get 401 from now on."""
    if not service.revoke_api_token(db, principal.user, token_id):
        raise HTTPException(404, "No such active token.")
    flash(db, principal, "Token revoked.")
    db.commit()
    return RedirectResponse("/tokens", status_code=303)


@session_router.get("/account")
def account_page(request: Request, db: DbSession, user: CurrentUser) -> Response:
    """Your account: who you are, and a form to change your password."""
    return render(request, "auth/account.html", {"user": user}, db=db)


@session_router.post("/account/password")
def change_password(
    request: Request,
    db: DbSession,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    current_password: Annotated[str, Form(max_length=1024)],
    new_password: Annotated[str, Form(max_length=1024)],
    confirm_password: Annotated[str, Form(max_length=1024)],
) -> Response:
    """Change your own password; every other session of yours is signed out."""
    if principal.via_token:
        raise HTTPException(400, "Passwords are changed in the browser, not with an API token.")
    user = principal.user
    try:
        # The same check (and throttle) as the login form: a borrowed session must not
        # become a way to guess the password.
        service.authenticate(
            db, settings, username=user.username, password=current_password, ip=client_ip(request)
        )
        if new_password != confirm_password:
            raise PasswordPolicyError("The two new passwords differ.")
        service.set_password(db, user, new_password, actor_id=user.id)
    except (service.AuthError, PasswordPolicyError) as exc:
        wrong = isinstance(exc, service.WrongCredentialsError)
        message = "Your current password is wrong." if wrong else str(exc)
        status_code = 429 if isinstance(exc, service.ThrottledError) else 422
        db.commit()  # keep the logged attempt
        return render(
            request, "auth/account.html", {"user": user, "error": message}, status_code=status_code
        )
    # set_password ended every session, this one included: start a fresh one for this browser.
    response = RedirectResponse("/account?changed=1", status_code=303)
    _start_session(request, response, db, settings, user)
    return response
