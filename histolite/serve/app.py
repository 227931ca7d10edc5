"""The FastAPI application: ``create_app(ServeSettings(...))``.

Endpoints (one router per area in ``serve.routes``): ``GET /v1/models`` (the repository: every
model, version and card), ``POST /v1/models/{name}[/versions/{version}]/predict`` and
``POST /v1/predict`` (the default model) for multipart uploads or JSON ``{"url": ...}``;
``POST /v1/slides`` and ``GET /v1/slides/{id}[/files/{name}]`` for whole-slide jobs when a slide
root is configured; ``GET /v1/model``, ``/healthz``, ``/readyz``, ``/metrics``, the upload page
at ``/`` and OpenAPI at ``/docs``. Bad input never gives a 500: every failure a client can cause
maps to a 4xx with a message naming what was wrong.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from histolite.serve.middleware import (
    AuditRejections,
    BodyLimit,
    ClientError,
    RequestMetrics,
    RequireKey,
    SecurityHeaders,
)
from histolite.serve.routes import ROUTERS
from histolite.serve.routes.page import STATIC_DIR
from histolite.serve.service import PredictionService
from histolite.serve.settings import ServeSettings
from histolite.serve.slide_jobs import JobError

__all__ = ["ServeSettings", "create_app", "create_app_from_env"]


def create_app(settings: ServeSettings) -> FastAPI:
    service = PredictionService(settings)
    repo = service.repository
    default = repo.get()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if service.jobs is not None:
            service.jobs.close()
        if service.audit is not None:
            service.audit.close()

    names = ", ".join(f"{n} (v{repo.default_version(n)})" for n in repo.names())
    app = FastAPI(
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
        title="histolite",
        version=str(default.card.get("version")),
        description=f"H&E classifiers: {names}. Default model: `{default.name}`.",
    )
    app.state.service, app.state.audit = service, service.audit
    app.state.classifier, app.state.metrics = default.model, service.metrics
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # added first, so it runs inside the metrics middleware and its 413s are counted
    app.add_middleware(
        BodyLimit,
        limit=settings.max_request_bytes,
        read_timeout=settings.body_read_timeout,
        total_timeout=settings.body_total_timeout,
    )
    if settings.api_key:  # before routing, so every protected path is covered
        open_paths: tuple[str, ...] = ("/healthz", "/readyz", "/", "/static/")
        if settings.open_metadata:
            open_paths += ("/v1/models", "/v1/model", "/metrics", "/docs", "/openapi.json")
        app.add_middleware(RequireKey, key=settings.api_key, open_paths=open_paths)
    app.add_middleware(SecurityHeaders)
    # every route with its path template, for requests refused before routing reaches them
    routes = [r for r in app.routes if isinstance(getattr(r, "path", None), str)]
    routes += [route for router in ROUTERS for route in router.routes]
    # outside the limit and the routes: audits their 413s, unknown-model 404s and 500s
    app.add_middleware(AuditRejections, write=service.audit_request, routes=routes)
    # outermost: sees every response, the BodyLimit 413s included
    app.add_middleware(RequestMetrics, metrics=service.metrics, routes=routes)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    for router in ROUTERS:
        app.include_router(router)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (several workers): settings from HISTOLITE_* variables."""
    return create_app(ServeSettings())  # type: ignore[call-arg]  # model_dir comes from the env
