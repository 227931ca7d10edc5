"""Liveness, readiness and Prometheus metrics.

Liveness and metrics run on the event loop, not in the worker pool that predictions, URL
fetches and audit writes can fill: a busy or stuck pool cannot fail the probe.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse

from histolite.serve.service import PredictionService, service

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: every model loaded and warmed up")
def readyz(svc: PredictionService = Depends(service)) -> JSONResponse:
    ready = svc.ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def prometheus(svc: PredictionService = Depends(service)) -> PlainTextResponse:
    return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4")
