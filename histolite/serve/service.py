"""What a prediction request does apart from HTTP routing: read, classify, audit, count.

One :class:`PredictionService` per app holds the model repository, the audit log, the URL
fetcher, the metrics and the slide job queue; the routers (``serve.routes``) reach it through
the ``service`` dependency.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from histolite.data.images import ImageTooLarge, decode_rgb
from histolite.errors import DataError
from histolite.runtime.cam import CamGrid
from histolite.serve.audit import AuditLog, AuditUnavailable, Entry, load_audit_key
from histolite.serve.fetch import UrlFetcher, UrlFetchError
from histolite.serve.metrics import Metrics
from histolite.serve.middleware import AUDITED, ClientError, client_status
from histolite.serve.repository import ModelEntry, Repository, load_repository
from histolite.serve.settings import ServeSettings
from histolite.serve.slide_jobs import SlideJobs, SlideJobSettings


class PredictionService:
    """What a prediction request does, apart from HTTP routing: read, classify, audit, count."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self._slots: anyio.CapacityLimiter | None = None
        self.repository: Repository = load_repository(settings.model_dir, settings.threads)
        cards = json.dumps(self.repository.describe(), sort_keys=True, default=str)
        key = load_audit_key(settings.audit_key_file) if settings.audit_key_file else None
        self.audit = (
            AuditLog(settings.audit_db, genesis=hashlib.sha256(cards.encode()).hexdigest(), key=key)
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
                    max_running=settings.slide_jobs_running,
                    max_queued=settings.slide_jobs_queued,
                    max_seconds=settings.slide_job_max_seconds,
                    max_tiles=settings.slide_job_max_tiles,
                    disk_quota_bytes=settings.slide_jobs_disk_quota_mb * 1024**2,
                    retention_hours=settings.slide_jobs_retention_hours,
                ),
                self.repository,
                self.audit,
            )
            self.metrics.add_gauges(self.jobs.gauges)

    def audit_request(self, entry: Entry) -> None:
        """One audit row for a request the routes could not audit (see AuditRejections)."""
        if self.audit is not None:
            self.audit.write([entry])

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
            body = await read_json_body(request)
            url = body.get("url") if isinstance(body, dict) else None
            if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
                raise ClientError(
                    422,
                    f'JSON body must be {{"url": "http(s)://..."}} (at most {MAX_URL_LENGTH} '
                    "characters)",
                )
            try:
                data = await self.fetcher.fetch(url)
            except UrlFetchError as exc:
                raise ClientError(exc.status, str(exc)) from exc
            return [(data, url.rsplit("/", 1)[-1] or url)]
        raise ClientError(415, "send multipart/form-data (field 'files') or JSON {\"url\": ...}")

    def classify(
        self,
        entry: ModelEntry,
        data: bytes,
        filename: str | None,
        client: str | None,
        pixels_left: int | None = None,
    ) -> dict[str, Any]:
        """One image's answer; ``pixels_left`` of the request's budget bound its size too."""
        started = time.perf_counter()
        limit = self.settings.max_pixels
        if pixels_left is not None and pixels_left < limit:
            if pixels_left < 1:
                raise ClientError(413, self._request_budget_message(filename))
            limit = pixels_left
        try:
            pixels = decode_rgb(data, filename or "upload", max_pixels=limit)
        except ImageTooLarge as exc:
            if limit < self.settings.max_pixels:  # refused by the request's budget, not its own
                raise ClientError(413, f"{self._request_budget_message(filename)} ({exc})") from exc
            raise ClientError(client_status(exc), str(exc)) from exc
        except DataError as exc:
            raise ClientError(client_status(exc), str(exc)) from exc
        classes = entry.model.classes
        try:
            prediction = entry.model.predict(pixels)
        except DataError as exc:  # a bag model's bound on patches per image
            raise ClientError(client_status(exc), str(exc)) from exc
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

    def _request_budget_message(self, filename: str | None) -> str:
        total = self.settings.max_request_pixels
        return (
            f"{filename or 'upload'}: the request's images together exceed {total:,} pixels "
            "(HISTOLITE_MAX_REQUEST_PIXELS); send them in several requests"
        )

    async def predict(self, request: Request, entry: ModelEntry) -> JSONResponse:
        """Classify every image of the request, then audit the request as one unit.

        The API key was checked before routing (``middleware.RequireKey``).
        """
        # a locked database makes this wait seconds: never on the event loop (health, metrics)
        await run_in_threadpool(self.require_audit)
        client = request.client.host if request.client else None
        request_id = uuid.uuid4().hex
        try:
            items = await self.read_images(request)
            results = []
            pixels_left = self.settings.max_request_pixels
            for data, name in items:
                result = await anyio.to_thread.run_sync(
                    self.classify,
                    entry,
                    data,
                    name,
                    client,
                    pixels_left,
                    limiter=self._prediction_slots(),
                )
                pixels_left -= result["image_size"]["height"] * result["image_size"]["width"]
                results.append(result)
        except ClientError as exc:
            await run_in_threadpool(self._audit_rejected, request_id, client, entry, exc)
            request.scope[AUDITED] = True
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
            request.scope[AUDITED] = True
        for result in results:
            self.metrics.observe_prediction(result["class"])
        # plain JSON types already: skip FastAPI's jsonable_encoder pass over the patch grid,
        # and render in a thread: a fine patch grid of a large image is megabytes of JSON
        return await run_in_threadpool(
            JSONResponse,
            {
                "request_id": request_id,
                "model": entry.name,
                "model_version": entry.version,
                "predictions": results,
            },
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


MAX_JSON_BYTES = 16 * 1024  # a URL or a slide name: a few hundred bytes do, 16 KB is generous
MAX_URL_LENGTH = 2048


async def read_json_body(request: Request, limit: int = MAX_JSON_BYTES) -> Any:
    """A small JSON body, refused past ``limit`` bytes before any parsing, parsed off the event
    loop: six 25 MB bodies of nested empty objects once stalled /healthz for 12 s and took the
    server to 3.9 GB while being parsed, only to be answered 422."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"JSON bodies are at most {limit} bytes on this endpoint")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ClientError(413, f"JSON bodies are at most {limit} bytes on this endpoint")
    try:
        return await anyio.to_thread.run_sync(json.loads, bytes(body))
    except ValueError as exc:  # JSONDecodeError, bad UTF-8
        raise ClientError(422, f"request body is not valid JSON ({str(exc)[:120]})") from exc
    except RecursionError as exc:  # b"[" * 3000: json's decoder recurses once per level
        raise ClientError(
            422,
            "request body is JSON nested too deeply; expected a flat object such as "
            '{"url": ...} or {"slide": ...}',
        ) from exc


async def service(request: Request) -> PredictionService:
    """The app's service (a FastAPI dependency of every router). Async so that resolving it
    never takes a worker thread: the probes and /metrics stay on the event loop."""
    found: PredictionService = request.app.state.service
    return found


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
