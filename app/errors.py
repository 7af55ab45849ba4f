"""Error responses a person can read: HTML pages, htmx-friendly answers, JSON for the API."""

from __future__ import annotations

import logging
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, RedirectResponse, Response

from app.web import NotAuthenticated, is_htmx, render

log = logging.getLogger("prefloop")

TITLES = {
    400: "Bad request",
    401: "Please sign in",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Too large",
    422: "Invalid input",
    429: "Slow down",
    500: "Something went wrong",
    503: "Service unavailable",
}


def _wants_json(request: Request) -> bool:
    return (
        request.url.path.startswith("/api/")
        or "application/json" in request.headers.get("accept", "").split(",")[0]
    )


def _local_path(url: str) -> str | None:
    """The path and query of a URL, or None; only ever a path on this site."""
    parts = urlsplit(url)
    if not parts.path.startswith("/") or parts.path.startswith("//"):
        return None
    return parts.path + (f"?{parts.query}" if parts.query else "")


def error_response(
    request: Request, status_code: int, message: str, headers: dict[str, str] | None = None
) -> Response:
    title = TITLES.get(status_code, "Error")
    if _wants_json(request):
        return JSONResponse(
            {"error": title, "detail": message}, status_code=status_code, headers=headers
        )
    template = "errors/fragment.html" if is_htmx(request) else "errors/page.html"
    response = render(
        request,
        template,
        {"status_code": status_code, "title": title, "message": message},
        status_code=status_code,
    )
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, exc: NotAuthenticated) -> Response:
        if _wants_json(request):
            return JSONResponse(
                {"error": "Unauthorized", "detail": "Sign in or send a valid API token."},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if is_htmx(request):
            # htmx would swap a login page into a fragment; tell it to navigate instead, and
            # to come back to the page the request came from (a task keeps its lease).
            back = _local_path(request.headers.get("HX-Current-URL", ""))
            target = f"/login?next={quote(back, safe='/')}" if back else "/login"
            return Response(status_code=401, headers={"HX-Redirect": target})
        if request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)
        return error_response(request, 401, "Your session has ended. Sign in again.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = (
            exc.detail if isinstance(exc.detail, str) else TITLES.get(exc.status_code, "Error")
        )
        if exc.status_code == 404 and message == "Not Found":
            message = "There is nothing at this address."
        if exc.status_code == 405 and message == "Method Not Allowed":
            message = "This address does not accept that kind of request."
        return error_response(
            request, exc.status_code, message, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if _wants_json(request):
            # Only where and what: the raw input may be bytes (a form sent to a JSON endpoint)
            # and has no business being echoed back.
            detail = [
                {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                for e in exc.errors()
            ]
            return JSONResponse({"error": "Invalid input", "detail": detail}, status_code=422)
        fields = ", ".join(sorted({str(e["loc"][-1]) for e in exc.errors() if e.get("loc")}))
        return error_response(request, 422, f"Some fields are missing or invalid: {fields}.")

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def database_error(request: Request, exc: Exception) -> Response:
        log.error(
            "database error on %s %s: %s",
            request.method,
            request.url.path,
            exc.__class__.__name__,
            exc_info=exc,
        )
        return error_response(request, 503, "The database is not answering. Try again in a minute.")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(
            request, 500, "The error was logged. Try again, or tell an admin what you did."
        )
