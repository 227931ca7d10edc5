"""Whole-slide jobs of the service: queued, run in the background, kept on disk.

A client names a slide *under the configured slide root* (never an arbitrary path or URL) and a
model; the job runs ``histolite slide infer``'s code on a bounded pool of threads, and its state
is one JSON file per job, rewritten atomically, so jobs and results survive a restart: a job
that was queued or running when the service stopped is queued again when it starts.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolite.errors import HistoliteError
from histolite.fileio import read_json, write_json
from histolite.serve.audit import AuditUnavailable
from histolite.serve.repository import Repository
from histolite.slide.inference import SlideSettings, classify_slide
from histolite.slide.layout import BatchOutputs
from histolite.slide.reader import SLIDE_SUFFIXES

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
PENDING = ("queued", "running")
JOB_KEYS = ("id", "slide", "model", "version", "status", "created")
LOG = logging.getLogger(__name__)


class JobError(Exception):
    """A job request the service refuses; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SlideJobSettings:
    slide_root: Path
    jobs_dir: Path
    max_running: int = 1
    max_queued: int = 8


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _one_line(exc: BaseException) -> str:
    """A failure as one short line: job pages and audit rows are no place for tracebacks."""
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = message.strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(exc, HistoliteError | OSError | KeyError | ValueError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:300]


def _read_job(path: Path) -> dict[str, Any]:
    """A job's state file, checked: a damaged one must not be run or served as a job."""
    job = read_json(path)
    if not isinstance(job, dict) or any(not isinstance(job.get(k), str) for k in JOB_KEYS):
        raise ValueError(f"not a slide job (needs string fields {', '.join(JOB_KEYS)})")
    if job["id"] != path.parent.name or not JOB_ID.match(job["id"]):
        raise ValueError("its id is not its folder's name")
    return job


class SlideJobs:
    """The job queue: submit, look up, and the files a finished job wrote."""

    def __init__(
        self, settings: SlideJobSettings, repository: Repository, audit: Any | None = None
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.audit = audit
        self.root = settings.slide_root.resolve()
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=settings.max_running, thread_name_prefix="slide-job"
        )
        self._jobs: dict[str, dict[str, Any]] = {}
        self.broken: dict[str, str] = {}  # job folder -> why its state was not loaded
        for path in sorted(settings.jobs_dir.glob("*/job.json")):
            try:
                job = _read_job(path)
            except (HistoliteError, OSError, ValueError) as exc:
                # one damaged file must not stop the service: reported, skipped, kept on disk
                folder = path.parent.name
                self.broken[folder] = self._public(_one_line(exc))
                LOG.warning("skipped slide job %s: %s", folder, self.broken[folder])
                continue
            self._jobs[job["id"]] = job
        for job in sorted(self._jobs.values(), key=lambda j: j["created"]):
            if job["status"] in PENDING:  # interrupted by a restart: run it again
                job["status"], job["restarted"] = "queued", job.get("restarted", 0) + 1
                self._save(job)
                self._pool.submit(self._run, job["id"])

    def _save(self, job: dict[str, Any]) -> None:
        write_json(self.settings.jobs_dir / job["id"] / "job.json", job)

    def _public(self, text: str) -> str:
        """``text`` with the server's folders cut: slides relative to the slide root, job files
        relative to the jobs folder, so clients and the audit log never see absolute paths."""
        bases = {str(self.root), str(self.settings.jobs_dir), str(self.settings.jobs_dir.resolve())}
        for base in sorted(bases, key=len, reverse=True):
            text = re.sub(
                re.escape(base) + r"(/|(?=[\s:'\",)]|$))", lambda m: "" if m[1] else ".", text
            )
        return text

    def _slide_path(self, slide: str) -> Path:
        if not isinstance(slide, str) or not slide or "\x00" in slide:
            raise JobError(422, 'name a slide: {"slide": "relative/path.svs", "model": ...}')
        path = (self.root / slide).resolve()
        if not path.is_relative_to(self.root) or Path(slide).is_absolute():
            raise JobError(403, "slides must be named relative to the slide root")
        if path.suffix.lower() not in SLIDE_SUFFIXES:
            raise JobError(
                422, f"{slide!r} is not a slide file ({', '.join(sorted(SLIDE_SUFFIXES))})"
            )
        if not path.is_file():
            raise JobError(404, f"no slide {slide!r} under the slide root")
        return path

    def submit(
        self, slide: str, model: str | None, version: str | None, client: str | None
    ) -> dict[str, Any]:
        path = self._slide_path(slide)
        try:
            entry = self.repository.get(model, version)
        except KeyError as exc:
            raise JobError(404, str(exc.args[0])) from exc
        if entry.model.is_bag_model:  # refused now, not accepted and failed in the worker
            raise JobError(
                422,
                f"model {entry.name!r} v{entry.version} is an attention-MIL bag model: it "
                "classifies images, not slide tiles; slides go through `histolite slide "
                "features` and `histolite slide predict`. Choose a tile classifier.",
            )
        with self._lock:
            pending = sum(job["status"] in PENDING for job in self._jobs.values())
            if pending >= self.settings.max_queued:
                raise JobError(429, f"{pending} slide jobs are queued or running; try again later")
            job: dict[str, Any] = {
                "id": uuid.uuid4().hex,
                "slide": str(path.relative_to(self.root)),
                "model": entry.name,
                "version": entry.version,
                "status": "queued",
                "created": _now(),
                "client": client,
                "progress": {"tiles_done": 0, "tiles_total": None},
            }
            self._jobs[job["id"]] = job
            self._save(job)
        self._audit(job, "submitted")
        self._pool.submit(self._run, job["id"])
        return job

    def _audit(self, job: dict[str, Any], event: str, detail: str | None = None) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record_job(
                client=job.get("client"),
                job_id=job["id"],
                slide=job["slide"],
                model_name=job["model"],
                model_version=job["version"],
                event=event,
                detail=detail,
            )
        except AuditUnavailable as exc:
            if event == "submitted":  # not started: the client may retry once the log is back
                with self._lock:
                    self._jobs[job["id"]]["status"] = "failed"
                    self._jobs[job["id"]]["error"] = str(exc)
                    self._save(self._jobs[job["id"]])
                raise JobError(503, f"{exc}; the slide job was not started") from exc

    def _update(self, job_id: str, **changes: Any) -> dict[str, Any]:
        with self._lock:
            job = self._jobs[job_id]
            job.update(changes)
            self._save(job)
            return dict(job)

    def _progress(self, job_id: str, done: int, total: int) -> None:
        self._update(job_id, progress={"tiles_done": done, "tiles_total": total})

    def _run(self, job_id: str) -> None:
        """The worker: every outcome ends the job, done or failed, and audited."""
        try:
            self._work(job_id)
        except Exception as exc:  # anything at all: a job must never stay "running"
            reason = self._public(_one_line(exc))
            with self._lock:
                job = self._jobs[job_id]
                job.update(status="failed", finished=_now(), error=reason)
                with contextlib.suppress(OSError):  # unsaved: a restart runs it again
                    self._save(job)
                job = dict(job)
            self._audit(job, "failed", reason)

    def _work(self, job_id: str) -> None:
        job = self._update(job_id, status="running", started=_now())
        entry = self.repository.get(job["model"], job["version"])
        summary = classify_slide(
            self.root / job["slide"],
            entry.model,
            self.settings.jobs_dir / job_id,
            SlideSettings(),
            progress=False,
            on_progress=lambda done, total: self._progress(job_id, done, total),
            # the slide as the client named it, not its path on this server; the served name
            # and version (a repository's folders), not the card's own labels
            rename={"slide": job["slide"], "model": entry.name, "model_version": entry.version},
        )
        counts = summary["class_counts"]
        job = self._update(
            job_id,
            status="done",
            finished=_now(),
            result={
                "tiles": summary["tiles"],
                "tissue_area_mm2": summary["tissue_area_mm2"],
                "class_counts": counts,
            },
        )
        top = max(counts, key=counts.get) if summary["tiles"] else "no tissue"
        self._audit(job, "done", f"{summary['tiles']} tiles; most tiles: {top}")

    def get(self, job_id: str) -> dict[str, Any]:
        if not JOB_ID.match(job_id):
            raise JobError(404, "no such slide job")
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobError(404, "no such slide job")
            return dict(job)

    def output(self, job_id: str, name: str) -> Path:
        """A finished job's output: summary.json, geojson, heatmap.png or tiles.csv."""
        job = self.get(job_id)
        if job["status"] != "done":
            raise JobError(409, f"the job is {job['status']}; outputs exist once it is done")
        files = BatchOutputs(self.settings.jobs_dir / job_id).slide(job["slide"]).served_files()
        if name not in files:
            raise JobError(404, f"no output {name!r}; outputs: {', '.join(files)}")
        return files[name]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
