"""Whole-slide jobs for slides under the configured slide root: submit, follow, fetch outputs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from histolite.serve.middleware import ClientError
from histolite.serve.service import PredictionService, read_json_body, service
from histolite.serve.slide_jobs import SlideJobs

router = APIRouter(tags=["slides"])
MEDIA = {
    "geojson": "application/geo+json",
    "heatmap.png": "image/png",
    "uncertainty.png": "image/png",
}


def _jobs(svc: PredictionService) -> SlideJobs:
    """The job queue; the API key was checked before routing (``middleware.RequireKey``)."""
    if svc.jobs is None:
        raise ClientError(404, "slide jobs are off: start the service with --slide-root")
    return svc.jobs


@router.post("/v1/slides", summary="Classify a slide under the slide root in the background")
async def submit_slide(request: Request, svc: PredictionService = Depends(service)) -> JSONResponse:
    jobs = _jobs(svc)
    body = await read_json_body(request)
    if not isinstance(body, dict):
        raise ClientError(422, 'JSON body must be {"slide": "relative/path.svs"}')
    client = request.client.host if request.client else None
    slide, model, version = body.get("slide"), body.get("model"), body.get("version")
    if not isinstance(slide, str) or not all(
        v is None or isinstance(v, str) for v in (model, version)
    ):
        raise ClientError(422, 'JSON body must be {"slide": "path", "model": "name"}')
    job = await run_in_threadpool(jobs.submit, slide, model, version, client)
    return JSONResponse(job_view(job), status_code=202)


@router.get("/v1/slides/{job_id}", summary="A slide job's progress, then links to its results")
def slide_job(job_id: str, svc: PredictionService = Depends(service)) -> JSONResponse:
    return JSONResponse(job_view(_jobs(svc).get(job_id)))


@router.get("/v1/slides/{job_id}/files/{name}", summary="An output of a finished slide job")
def slide_file(job_id: str, name: str, svc: PredictionService = Depends(service)) -> FileResponse:
    path = _jobs(svc).output(job_id, name)
    media = MEDIA.get(name, "application/json" if name.endswith(".json") else "text/csv")
    return FileResponse(path, media_type=media)


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """A job as clients see it (no client address), with links to its outputs once done."""
    view = {k: v for k, v in job.items() if k != "client"}
    if job["status"] == "done":
        base = f"/v1/slides/{job['id']}/files"
        view["links"] = {
            "summary": f"{base}/summary.json",
            "geojson": f"{base}/geojson",
            "heatmap": f"{base}/heatmap.png",
            "uncertainty": f"{base}/uncertainty.png",
            "tiles": f"{base}/tiles.csv",
        }
    return view
