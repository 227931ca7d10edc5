"""Classify uploads or one image URL: with the default model, a model's newest version, or one
version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from histolite.serve.service import PredictionService, service

router = APIRouter(tags=["predictions"])

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


@router.post(
    "/v1/predict",
    openapi_extra=PREDICT_BODY,
    summary="Classify uploaded images or one image URL with the default model",
)
async def predict(request: Request, svc: PredictionService = Depends(service)) -> JSONResponse:
    return await svc.predict(request, svc.model())


@router.post(
    "/v1/models/{name}/predict",
    openapi_extra=PREDICT_BODY,
    summary="Classify with a model's newest version",
)
async def predict_with(
    name: str, request: Request, svc: PredictionService = Depends(service)
) -> JSONResponse:
    return await svc.predict(request, svc.model(name))


@router.post(
    "/v1/models/{name}/versions/{version}/predict",
    openapi_extra=PREDICT_BODY,
    summary="Classify with one version of a model",
)
async def predict_with_version(
    name: str, version: str, request: Request, svc: PredictionService = Depends(service)
) -> JSONResponse:
    return await svc.predict(request, svc.model(name, version))
