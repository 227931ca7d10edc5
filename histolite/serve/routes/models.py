"""The model repository: every model, its versions and cards; the default model's card."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from histolite.serve.service import PredictionService, service

router = APIRouter(tags=["models"])


@router.get("/v1/models", summary="Every model, its versions and their model cards")
def models(svc: PredictionService = Depends(service)) -> dict[str, Any]:
    repo, default = svc.repository, svc.model()
    return {
        "default": {"name": default.name, "version": default.version},
        "models": repo.describe(),
        "unavailable": [{"folder": k, "error": v} for k, v in sorted(repo.broken.items())],
    }


@router.get("/v1/model", summary="The default model's card")
def model_card(svc: PredictionService = Depends(service)) -> dict[str, Any]:
    return svc.model().public_card()
