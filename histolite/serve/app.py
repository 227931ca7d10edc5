"""The FastAPI application: ``create_app(ServeSettings(...))``.

Endpoints: ``GET /v1/models`` (the repository: every model, version and card),
``POST /v1/models/{name}[/versions/{version}]/predict`` and ``POST /v1/predict`` (the default
model) for multipart uploads or JSON ``{"url": ...}``; ``POST /v1/slides`` and
``GET /v1/slides/{id}[/files/{name}]`` for whole-slide jobs when a slide root is configured;
``GET /v1/model``, ``/healthz``, ``/readyz``, ``/metrics``, the upload page at ``/`` and OpenAPI
at ``/docs``. Bad input never gives a 500: every failure a client can cause maps to a 4xx with
a message naming what was wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from histolite.data.images import decode_rgb
from histolite.errors import DataError
from histolite.runtime.cam import CamGrid
from histolite.serve.audit import AuditLog, AuditUnavailable, Entry
from histolite.serve.fetch import UrlFetcher, UrlFetchError
from histolite.serve.metrics import Metrics
from histolite.serve.middleware import (
    BodyLimit,
    ClientError,
    RequestMetrics,
    RequireKey,
    SecurityHeaders,
    client_status,
)
from histolite.serve.repository import ModelEntry, Repository, load_repository
from histolite.serve.slide_jobs import JobError, SlideJobs, SlideJobSettings

STATIC_DIR = Path(__file__).parent / "static"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


@dataclass
class ServeSettings:
    model_dir: Path  # one exported model, or a repository <name>/<version>/
    api_key: str | None = None
    audit_db: Path | None = Path("histolite_audit.sqlite")
    max_request_bytes: int = 25 * 1024 * 1024
    max_files: int = 16
    max_pixels: int = 60_000_000
    url_timeout: float = 10.0
    allow_private_urls: bool = False
    threads: int | None = None
    slide_root: Path | None = None  # slide jobs only for slides under this folder
    jobs_dir: Path | None = None  # job state and results (default: next to the audit log)
    max_slide_jobs_running: int = 1
    max_slide_jobs_queued: int = 8
    docs: bool = False  # Swagger UI at /docs loads its script from a CDN: off by default
    open_metadata: bool = False  # with an API key: leave /v1/models, /metrics, /docs open
    max_url_fetches: int = 8  # concurrent URL fetches; more are answered 429
    # images decoded and classified at once; the others wait. Peak memory is about
    # 75 MB + this x 8 bytes x max_pixels (benchmarks/decode_memory.py)
    max_concurrent_predictions: int = 2

    @classmethod
    def from_env(cls) -> ServeSettings:
        """Settings from HISTOLITE_* variables (how uvicorn workers get their configuration)."""
        env = os.environ
        audit = env.get("HISTOLITE_AUDIT_DB", "histolite_audit.sqlite")
        return cls(
            model_dir=Path(env["HISTOLITE_MODEL_DIR"]),
            api_key=env.get("HISTOLITE_API_KEY") or None,
            audit_db=Path(audit) if audit else None,
            max_request_bytes=int(env.get("HISTOLITE_MAX_REQUEST_BYTES", 25 * 1024 * 1024)),
            max_pixels=int(env.get("HISTOLITE_MAX_PIXELS", 60_000_000)),
            threads=int(env["HISTOLITE_THREADS"]) if env.get("HISTOLITE_THREADS") else None,
            slide_root=_env_path("HISTOLITE_SLIDE_ROOT"),
            jobs_dir=_env_path("HISTOLITE_JOBS_DIR"),
            max_slide_jobs_running=int(env.get("HISTOLITE_SLIDE_JOBS_RUNNING", 1)),
            max_slide_jobs_queued=int(env.get("HISTOLITE_SLIDE_JOBS_QUEUED", 8)),
            docs=env.get("HISTOLITE_DOCS", "0") == "1",
            open_metadata=env.get("HISTOLITE_OPEN_METADATA", "0") == "1",
            max_url_fetches=int(env.get("HISTOLITE_MAX_URL_FETCHES", 8)),
            max_concurrent_predictions=int(env.get("HISTOLITE_MAX_CONCURRENT_PREDICTIONS", 2)),
            # tests and benchmarks on loopback only; never in a deployment
            allow_private_urls=env.get("HISTOLITE_ALLOW_PRIVATE_URLS", "0") == "1",
        )


PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["url"],
                    "properties": {
                        "url": {
                            "type": "string",
                            "format": "uri",
                            "description": "public http(s) URL of an image",
                        }
                    },
                }
            },
        },
    }
}


class PredictionService:
    """What a prediction request does, apart from HTTP routing: read, classify, audit, count."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self._slots: anyio.CapacityLimiter | None = None
        self.repository: Repository = load_repository(settings.model_dir, settings.threads)
        cards = json.dumps(self.repository.describe(), sort_keys=True, default=str)
        self.audit = (
            AuditLog(settings.audit_db, genesis=hashlib.sha256(cards.encode()).hexdigest())
            if settings.audit_db
            else None
        )
        self.metrics = Metrics()
        self.fetcher = UrlFetcher(
            timeout=settings.url_timeout,
            max_bytes=settings.max_request_bytes,
            allow_private=settings.allow_private_urls,
            max_concurrent=settings.max_url_fetches,
        )
        self.jobs: SlideJobs | None = None
        if settings.slide_root is not None:
            jobs_dir = settings.jobs_dir or (
                (settings.audit_db.parent if settings.audit_db else Path(".")) / "slide_jobs"
            )
            self.jobs = SlideJobs(
                SlideJobSettings(
                    settings.slide_root,
                    jobs_dir,
                    settings.max_slide_jobs_running,
                    settings.max_slide_jobs_queued,
                ),
                self.repository,
                self.audit,
            )

    def model(self, name: str | None = None, version: str | None = None) -> ModelEntry:
        try:
            return self.repository.get(name, version)
        except KeyError as exc:
            raise ClientError(404, str(exc.args[0])) from exc

    @property
    def ready(self) -> bool:
        models = all(e.model.ready for v in self.repository.models.values() for e in v.values())
        return models and (self.audit is None or self.audit.healthy())

    def require_audit(self) -> None:
        """Refuse work that could not be recorded (503), before doing it."""
        if self.audit is not None and not self.audit.healthy():
            raise ClientError(
                503, f"the audit log is unavailable ({self.audit.failure}); retry later"
            )

    def _prediction_slots(self) -> anyio.CapacityLimiter:
        """Bounds decoded images in memory: waiting requests hold no thread, only a place in
        the limiter's queue. Made on first use, inside the event loop it belongs to."""
        if self._slots is None:
            self._slots = anyio.CapacityLimiter(self.settings.max_concurrent_predictions)
        return self._slots

    def check_key(self, request: Request) -> None:
        if self.settings.api_key is None:
            return
        supplied = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            supplied = supplied or auth[7:]
        if not hmac.compare_digest(supplied.encode(), self.settings.api_key.encode()):
            raise ClientError(401, "missing or wrong API key (X-API-Key header)")

    async def read_images(self, request: Request) -> list[tuple[bytes, str | None]]:
        """(bytes, file name) of each uploaded file, or of the one image a JSON URL names."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=self.settings.max_files, max_fields=32)
            except ClientError:
                raise
            except Exception as exc:  # malformed multipart, too many parts
                raise ClientError(400, f"malformed multipart upload ({exc})") from exc
            uploads = [v for _, v in form.multi_items() if hasattr(v, "read")]
            if not uploads:
                raise ClientError(422, "no files in the upload; send images in the 'files' field")
            return [(await u.read(), getattr(u, "filename", None)) for u in uploads]
        if content_type.startswith("application/json"):
            try:
                body = await request.json()
            except ClientError:
                raise
            except Exception as exc:
                raise ClientError(422, f"request body is not valid JSON ({exc})") from exc
            url = body.get("url") if isinstance(body, dict) else None
            if not isinstance(url, str) or not url:
                raise ClientError(422, 'JSON body must be {"url": "http(s)://..."}')
            try:
                data = await self.fetcher.fetch(url)
            except UrlFetchError as exc:
                raise ClientError(exc.status, str(exc)) from exc
            return [(data, url.rsplit("/", 1)[-1] or url)]
        raise ClientError(415, "send multipart/form-data (field 'files') or JSON {\"url\": ...}")

    def classify(
        self, entry: ModelEntry, data: bytes, filename: str | None, client: str | None
    ) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            pixels = decode_rgb(data, filename or "upload", max_pixels=self.settings.max_pixels)
        except DataError as exc:
            raise ClientError(client_status(exc), str(exc)) from exc
        classes = entry.model.classes
        prediction = entry.model.predict(pixels)
        probs = {
            c: round(float(p), 6) for c, p in zip(classes, prediction.probabilities, strict=True)
        }
        predicted = classes[prediction.top_class()]
        result: dict[str, Any] = {
            "filename": filename,
            "class": predicted,
            "probability": probs[predicted],
            "probabilities": probs,
            "calibrated": entry.model.calibrated,
            # confidence, entropy, and the card's flags: uncertain (below the abstention
            # threshold) and out_of_distribution (null when the card sets no threshold)
            **_rounded(prediction.uncertainty),
            "image_size": {"height": int(pixels.shape[0]), "width": int(pixels.shape[1])},
            "model": entry.name,
            "model_version": entry.version,
            "time_ms": 0.0,
        }
        if prediction.attention is not None:  # a bag model: where it looked, per patch
            size, (height, width) = prediction.patch_size, pixels.shape[:2]
            # an image smaller than one patch is one instance: its box is the image, no bigger
            result["attention"] = [
                {
                    "x": x,
                    "y": y,
                    "width": min(size, width - x),
                    "height": min(size, height - y),
                    "weight": round(w, 6),
                }
                for y, x, w in prediction.attention
            ]
            result["patches"] = None
        else:
            rows, cols = prediction.patch_probabilities.shape[:2]
            result["patches"] = {
                "rows": rows,
                "cols": cols,
                "size": prediction.patch_size,
                "stride": prediction.stride,
                "probabilities": [
                    [[round(float(v), 5) for v in cell] for cell in row]
                    for row in prediction.patch_probabilities
                ],
            }
        result["explanation"] = _gradcam_view(prediction.explanation, predicted)
        result["time_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return result

    async def predict(self, request: Request, entry: ModelEntry) -> JSONResponse:
        """Classify every image of the request, then audit the request as one unit."""
        self.check_key(request)
        # a locked database makes this wait seconds: never on the event loop (health, metrics)
        await run_in_threadpool(self.require_audit)
        client = request.client.host if request.client else None
        request_id = uuid.uuid4().hex
        try:
            items = await self.read_images(request)
            results = [
                await anyio.to_thread.run_sync(
                    self.classify, entry, data, name, client, limiter=self._prediction_slots()
                )
                for data, name in items
            ]
        except ClientError as exc:
            await run_in_threadpool(self._audit_rejected, request_id, client, entry, exc)
            raise
        if self.audit is not None:
            entries = [
                Entry(
                    kind="prediction",
                    outcome="ok",
                    client=client,
                    request_id=request_id,
                    input_sha256=hashlib.sha256(data).hexdigest(),
                    filename=name,
                    model_name=entry.name,
                    model_version=entry.version,
                    predicted_class=result["class"],
                    probabilities=result["probabilities"],
                )
                for (data, name), result in zip(items, results, strict=True)
            ]
            try:
                await run_in_threadpool(self.audit.write, entries)
            except AuditUnavailable as exc:
                raise ClientError(503, f"{exc}; the prediction was not returned") from exc
        for result in results:
            self.metrics.observe_prediction(result["class"])
        # plain JSON types already: skip FastAPI's jsonable_encoder pass over the patch grid
        return JSONResponse(
            {
                "request_id": request_id,
                "model": entry.name,
                "model_version": entry.version,
                "predictions": results,
            }
        )

    def _audit_rejected(
        self, request_id: str, client: str | None, entry: ModelEntry, exc: ClientError
    ) -> None:
        if self.audit is None or exc.status in (401, 503):  # unauthenticated noise, or no log
            return
        # the client gets its 4xx whether or not this row is written; /readyz reports the log
        with contextlib.suppress(AuditUnavailable):
            self.audit.write(
                [
                    Entry(
                        kind="request",
                        outcome=f"rejected {exc.status}",
                        client=client,
                        request_id=request_id,
                        model_name=entry.name,
                        model_version=entry.version,
                        detail=str(exc)[:500],
                    )
                ]
            )


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
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    if settings.api_key:  # before routing, so every protected path is covered
        open_paths: tuple[str, ...] = ("/healthz", "/readyz", "/", "/static/")
        if settings.open_metadata:
            open_paths += ("/v1/models", "/v1/model", "/metrics", "/docs", "/openapi.json")
        app.add_middleware(RequireKey, key=settings.api_key, open_paths=open_paths)
    app.add_middleware(SecurityHeaders)
    # outermost: sees every response, the BodyLimit 413s included
    app.add_middleware(RequestMetrics, metrics=service.metrics)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.post(
        "/v1/predict",
        openapi_extra=PREDICT_BODY,
        summary="Classify uploaded images or one image URL with the default model",
    )
    async def predict(request: Request) -> JSONResponse:
        return await service.predict(request, default)

    @app.post(
        "/v1/models/{name}/predict",
        openapi_extra=PREDICT_BODY,
        summary="Classify with a model's newest version",
    )
    async def predict_with(name: str, request: Request) -> JSONResponse:
        return await service.predict(request, service.model(name))

    @app.post(
        "/v1/models/{name}/versions/{version}/predict",
        openapi_extra=PREDICT_BODY,
        summary="Classify with one version of a model",
    )
    async def predict_with_version(name: str, version: str, request: Request) -> JSONResponse:
        return await service.predict(request, service.model(name, version))

    @app.get("/v1/models", summary="Every model, its versions and their model cards")
    def models() -> dict[str, Any]:
        return {
            "default": {"name": default.name, "version": default.version},
            "models": repo.describe(),
            "unavailable": [{"folder": k, "error": v} for k, v in sorted(repo.broken.items())],
        }

    @app.get("/v1/model", summary="The default model's card")
    def model_card() -> dict[str, Any]:
        return default.public_card()

    @app.post("/v1/slides", summary="Classify a slide under the slide root in the background")
    async def submit_slide(request: Request) -> JSONResponse:
        service.check_key(request)
        if service.jobs is None:
            raise ClientError(404, "slide jobs are off: start the service with --slide-root")
        try:
            body = await request.json()
        except Exception as exc:
            raise ClientError(422, f"request body is not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise ClientError(422, 'JSON body must be {"slide": "relative/path.svs"}')
        client = request.client.host if request.client else None
        slide, model, version = body.get("slide"), body.get("model"), body.get("version")
        if not isinstance(slide, str) or not all(
            v is None or isinstance(v, str) for v in (model, version)
        ):
            raise ClientError(422, 'JSON body must be {"slide": "path", "model": "name"}')
        job = await run_in_threadpool(service.jobs.submit, slide, model, version, client)
        return JSONResponse(_job_view(job), status_code=202)

    @app.get("/v1/slides/{job_id}", summary="A slide job's progress, then links to its results")
    def slide_job(job_id: str, request: Request) -> JSONResponse:
        service.check_key(request)
        if service.jobs is None:
            raise ClientError(404, "slide jobs are off: start the service with --slide-root")
        return JSONResponse(_job_view(service.jobs.get(job_id)))

    @app.get("/v1/slides/{job_id}/files/{name}", summary="An output of a finished slide job")
    def slide_file(job_id: str, name: str, request: Request) -> FileResponse:
        service.check_key(request)
        if service.jobs is None:
            raise ClientError(404, "slide jobs are off: start the service with --slide-root")
        path = service.jobs.output(job_id, name)
        media = {"geojson": "application/geo+json", "heatmap.png": "image/png"}.get(
            name, "application/json" if name.endswith(".json") else "text/csv"
        )
        return FileResponse(path, media_type=media)

    # Liveness and metrics run on the event loop, not in the worker pool that predictions,
    # URL fetches and audit writes can fill: a busy or stuck pool cannot fail the probe.
    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: every model loaded and warmed up")
    def readyz() -> JSONResponse:
        ready = service.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


def _gradcam_view(grid: CamGrid | None, predicted: str) -> dict[str, Any] | None:
    """Grad-CAM of the answered class as a small grid in image pixels (the page paints it);
    ``None`` for bag models (their ``attention`` explains them) and graphs without ``cam``."""
    if grid is None:
        return None
    rows, cols = grid.values.shape
    return {
        "method": "gradcam",
        "class": predicted,
        "rows": int(rows),
        "cols": int(cols),
        "cell_height": round(grid.cell_height, 4),
        "cell_width": round(grid.cell_width, 4),
        "values": [[round(float(v), 3) for v in row] for row in grid.values],
    }


def _job_view(job: dict[str, Any]) -> dict[str, Any]:
    view = {k: v for k, v in job.items() if k != "client"}
    if job["status"] == "done":
        base = f"/v1/slides/{job['id']}/files"
        view["links"] = {
            "summary": f"{base}/summary.json",
            "geojson": f"{base}/geojson",
            "heatmap": f"{base}/heatmap.png",
            "tiles": f"{base}/tiles.csv",
        }
    return view


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (several workers): settings from HISTOLITE_* variables."""
    return create_app(ServeSettings.from_env())
