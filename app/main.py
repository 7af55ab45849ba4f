"""The FastAPI application: `create_app()` wires settings, database, middleware and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app import __version__, api
from app import models as _every_table  # noqa: F401  (the mappers need every table)
from app.auth import admin_views as user_admin_views
from app.auth import views as auth_views
from app.campaigns import views as campaign_views
from app.config import Settings, get_settings
from app.db import Database
from app.errors import install_error_handlers
from app.exports import api as exports_api
from app.exports import views as exports_views
from app.home import views as home_views
from app.jobs import api as jobs_api
from app.jobs import views as jobs_views
from app.labeling import api as labeling_api
from app.labeling import import_views
from app.labeling import views as labeling_views
from app.loop import views as loop_views
from app.middleware import BodySizeLimitMiddleware, SecurityHeadersMiddleware
from app.quality import views as quality_views
from app.web import ROOT

# Routes that accept large uploads (dataset imports); every other body is capped small.
UPLOAD_PREFIXES = ("/admin/imports", "/api/v1/imports")


def create_app(settings: Settings | None = None, database: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Sync handlers run in AnyIO's thread pool (40 threads by default). More threads than
        # connections only queue on the pool, and fight over the GIL while they wait.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.db_pool_size
        yield

    app = FastAPI(
        lifespan=lifespan,
        title="prefloop",
        version=__version__,
        docs_url=None,  # Swagger UI needs inline script and a CDN; the CSP allows neither
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.settings = settings
    app.state.db = database or Database(
        settings.database_url,
        statement_timeout_ms=settings.statement_timeout_ms,
        # A fixed pool: overflow connections are closed when returned, so under load every
        # request past the pool size would open (and tear down) a database session.
        **({} if settings.is_sqlite else {"pool_size": settings.db_pool_size, "max_overflow": 0}),
    )

    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        upload_max_bytes=settings.max_upload_bytes,
        upload_prefixes=UPLOAD_PREFIXES,
    )
    app.add_middleware(SecurityHeadersMiddleware)
    install_error_handlers(app)

    for router in (
        auth_views.public_router,
        auth_views.session_router,
        auth_views.tokens_router,
        home_views.admin_router,
        home_views.research_router,
        user_admin_views.router,
        campaign_views.router,
        import_views.router,
        labeling_views.router,
        labeling_api.router,
        quality_views.router,
        quality_views.api_router,
        exports_views.router,
        exports_api.router,
        jobs_views.router,
        jobs_api.router,
        loop_views.admin_router,
        loop_views.research_router,
        api.router,
        api.health_router,
    ):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    return app
