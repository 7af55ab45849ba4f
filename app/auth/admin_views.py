"""Admin pages for accounts: list, create, disable and re-enable."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from sqlalchemy import select
from starlette.responses import RedirectResponse, Response

from app.auth import service
from app.auth.models import Role, User
from app.auth.passwords import PasswordPolicyError, check_password_policy
from app.web import (
    CurrentPrincipal,
    DbSession,
    RowId,
    flash,
    is_htmx,
    render,
    render_block,
    require_roles,
)

router = APIRouter(prefix="/admin/users", dependencies=[Depends(require_roles(Role.admin))])


def _users_page(
    request: Request,
    db: DbSession,
    *,
    errors: dict[str, str] | None = None,
    form: dict | None = None,
    status_code: int = 200,
) -> Response:
    users = db.scalars(select(User).order_by(User.role, User.username)).all()
    return render(
        request,
        "admin/users.html",
        {"users": users, "roles": list(Role), "errors": errors or {}, "form": form or {}},
        status_code=status_code,
        db=db,
    )


@router.get("")
def list_users(request: Request, db: DbSession) -> Response:
    """Every account with its role and state."""
    return _users_page(request, db)


def _user_form_errors(db: DbSession, *, username: str, role: str, password: str) -> dict[str, str]:
    """Field -> what is wrong with it, for every field of the new-user form."""
    errors: dict[str, str] = {}
    name = username
    try:
        name = service.validate_username(username)
    except service.AuthError as exc:
        errors["username"] = str(exc)
    else:
        if service.get_user_by_username(db, name) is not None:
            errors["username"] = f"User '{name}' already exists."
    if role not in {r.value for r in Role}:
        errors["role"] = "Choose one of the listed roles."
    try:
        check_password_policy(password, username=name)
    except PasswordPolicyError as exc:
        errors["password"] = str(exc)
    return errors


@router.post("")
def create_user(
    request: Request,
    db: DbSession,
    principal: CurrentPrincipal,
    username: Annotated[str, Form(max_length=64)],
    role: Annotated[str, Form(max_length=32)],  # checked here, so all mistakes show at once
    password: Annotated[str, Form(max_length=1024)],
    display_name: Annotated[str, Form(max_length=128)] = "",
) -> Response:
    """Create an account; the admin passes the password on to its owner. Every wrong field
    is reported, not only the first."""
    form = {"username": username, "role": role, "display_name": display_name}
    errors = _user_form_errors(db, username=username, role=role, password=password)
    if errors:
        return _users_page(request, db, errors=errors, status_code=422, form=form)
    try:
        user = service.create_user(
            db,
            username=username,
            role=Role(role),
            password=password,
            display_name=display_name,
            actor_id=principal.user.id,
        )
    except (service.AuthError, PasswordPolicyError) as exc:  # e.g. a name taken meanwhile
        db.rollback()
        return _users_page(request, db, errors={"form": str(exc)}, status_code=422, form=form)
    flash(db, principal, f"Created {user.role.value} '{user.username}'.")
    db.commit()
    return RedirectResponse("/admin/users", status_code=303)


@router.post("/{user_id}/active")
def set_active(
    request: Request,
    db: DbSession,
    principal: CurrentPrincipal,
    user_id: RowId,
    active: Annotated[bool, Form()],
) -> Response:
    """Disable an account (its sessions end at once) or enable it again.

    From htmx the answer is the user's updated table row; otherwise a redirect to the list.
    """
    user = db.get(User, user_id)
    if user is None:
        raise HTTPException(404, "No such user.")
    if user.id == principal.user.id and not active:
        raise HTTPException(400, "You cannot disable your own account.")
    changed = user.is_active != active
    if changed:
        service.set_active(db, user, active, actor_id=principal.user.id)
    if is_htmx(request):
        db.commit()
        return render_block(request, "admin/users.html", "user_row", {"user": user})
    if changed:
        flash(db, principal, f"{'Enabled' if active else 'Disabled'} '{user.username}'.")
    db.commit()
    return RedirectResponse("/admin/users", status_code=303)
