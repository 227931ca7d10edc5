"""The FastAPI application: ``create_app(ServeSettings(...))``.

Endpoints: ``POST /v1/predict`` (multipart uploads or JSON ``{"url": ...}``), ``GET /v1/model``,
``GET /healthz``, ``GET /readyz``, ``GET /metrics``, the upload page at ``/`` and OpenAPI at
``/docs``. Bad input never gives a 500: every failure a client can cause maps to a 4xx with a
message naming what was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from histolite.data.images import decode_rgb
from histolite.errors import DataError
from histolite.export.runtime import OnnxClassifier
from histolite.serve.audit import AuditLog
from histolite.serve.fetch import UrlFetcher, UrlFetchError
from histolite.serve.metrics import Metrics
from histolite.serve.middleware import BodyLimit, ClientError, RequestMetrics, client_status

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServeSettings:
    model_dir: Path
    api_key: str | None = None
    audit_db: Path | None = Path("histolite_audit.sqlite")
    max_request_bytes: int = 25 * 1024 * 1024
    max_files: int = 16
    max_pixels: int = 60_000_000
    url_timeout: float = 10.0
    allow_private_urls: bool = False
    threads: int | None = None

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
        self.classifier = OnnxClassifier(settings.model_dir, threads=settings.threads)
        self.card = self.classifier.card
        self.audit = AuditLog(settings.audit_db) if settings.audit_db else None
        self.metrics = Metrics()
        self.fetcher = UrlFetcher(
            timeout=settings.url_timeout,
            max_bytes=settings.max_request_bytes,
            allow_private=settings.allow_private_urls,
        )

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
                data = await run_in_threadpool(self.fetcher.fetch, url)
            except UrlFetchError as exc:
                raise ClientError(exc.status, str(exc)) from exc
            return [(data, url.rsplit("/", 1)[-1] or url)]
        raise ClientError(415, "send multipart/form-data (field 'files') or JSON {\"url\": ...}")

    def classify(self, data: bytes, filename: str | None, client: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            pixels = decode_rgb(data, filename or "upload", max_pixels=self.settings.max_pixels)
        except DataError as exc:
            raise ClientError(client_status(exc), str(exc)) from exc
        classes = self.classifier.classes
        prediction = self.classifier.predict(pixels)
        probs = {
            c: round(float(p), 6) for c, p in zip(classes, prediction.probabilities, strict=True)
        }
        predicted = classes[prediction.top_class()]
        rows, cols = prediction.patch_probabilities.shape[:2]
        if self.audit is not None:
            self.audit.record(
                client=client,
                input_sha256=hashlib.sha256(data).hexdigest(),
                filename=filename,
                model_name=str(self.card.get("name")),
                model_version=str(self.card.get("version")),
                predicted_class=predicted,
                probabilities=probs,
            )
        self.metrics.observe_prediction(predicted)
        return {
            "filename": filename,
            "class": predicted,
            "probability": probs[predicted],
            "probabilities": probs,
            "image_size": {"height": int(pixels.shape[0]), "width": int(pixels.shape[1])},
            "patches": {
                "rows": rows,
                "cols": cols,
                "size": prediction.patch_size,
                "stride": prediction.stride,
                "probabilities": [
                    [[round(float(v), 5) for v in cell] for cell in row]
                    for row in prediction.patch_probabilities
                ],
            },
            "model_version": str(self.card.get("version")),
            "time_ms": round((time.perf_counter() - started) * 1000, 2),
        }


def create_app(settings: ServeSettings) -> FastAPI:
    service = PredictionService(settings)
    card = service.card

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if service.audit is not None:
            service.audit.close()

    app = FastAPI(
        lifespan=lifespan,
        title="histolite",
        version=str(card.get("version")),
        description=f"H&E tile classifier `{card.get('name')}` ({card.get('model')}, "
        f"{card.get('precision')}). Classes: {', '.join(service.classifier.classes)}.",
    )
    app.state.classifier, app.state.audit = service.classifier, service.audit
    app.state.metrics = service.metrics
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # added first, so it runs inside the metrics middleware and its 413s are counted
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    # outermost: sees every response, the BodyLimit 413s included
    app.add_middleware(RequestMetrics, metrics=service.metrics)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.post(
        "/v1/predict",
        openapi_extra=PREDICT_BODY,
        summary="Classify uploaded images or one image URL",
    )
    async def predict(request: Request) -> JSONResponse:
        service.check_key(request)
        client = request.client.host if request.client else None
        items = await service.read_images(request)
        results = [
            await run_in_threadpool(service.classify, data, name, client) for data, name in items
        ]
        # plain JSON types already: skip FastAPI's jsonable_encoder pass over the patch grid
        return JSONResponse(
            {
                "model": card.get("name"),
                "model_version": str(card.get("version")),
                "predictions": results,
            }
        )

    @app.get("/v1/model", summary="The model card")
    def model_card() -> dict[str, Any]:
        return card

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: model loaded and warmed up")
    def readyz() -> JSONResponse:
        ready = service.classifier.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (several workers): settings from HISTOLITE_* variables."""
    return create_app(ServeSettings.from_env())
