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
import math
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolite.errors import HistoliteError
from histolite.fileio import read_json, write_json
from histolite.serve.audit import AuditUnavailable
from histolite.serve.metrics import Gauge
from histolite.serve.repository import Repository, shown
from histolite.slide.inference import SlideSettings, classify_slide
from histolite.slide.layout import BatchOutputs
from histolite.slide.reader import SLIDE_SUFFIXES
from histolite.slide.tiles import TileBudgetExceeded

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_SLIDE_NAME = 1024  # bytes of a slide's relative path
MAX_SLIDE_DEPTH = 16
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\\]")  # control characters, backslashes
PENDING = ("queued", "running")
JOB_KEYS = ("id", "slide", "model", "version", "status", "created")
EXPIRE_EVERY_S = 60.0  # lookups run retention at most this often (it lists every job)
CLOSE_WAIT_S = 10.0  # how long a stop waits for the running job to reach its next check
LOG = logging.getLogger(__name__)


class JobError(Exception):
    """A job request the service refuses; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SlideJobSettings:
    """Where slides and results live, and what one job, and all of them, may cost."""

    slide_root: Path
    jobs_dir: Path
    max_running: int = 1
    max_queued: int = 8
    max_seconds: float = 3600.0  # a job's wall time, overview read included
    max_tiles: int = 250_000  # tissue tiles of one slide
    disk_quota_bytes: int = 10 * 1024**3  # results of every job together
    retention_hours: float = 168.0  # finished jobs' results are deleted after this; 0: kept
    max_attempts: int = 2  # a job whose worker was killed this often is failed, not re-queued


class JobBudgetExceeded(HistoliteError):
    """A job went over its time or tile budget (it fails, and is not run again)."""


class ServiceStopping(HistoliteError):
    """The service is shutting down: the running job stops and is queued for the next start."""


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


def _parse_time(value: Any, field: str) -> _dt.datetime:
    """A job's timestamp as written by :func:`_now`: ISO 8601 with a UTC offset.

    Raises:
        ValueError: not a string, not ISO 8601, or without an offset (a naive time cannot be
            compared with the retention cutoff).
    """
    if not isinstance(value, str):
        raise ValueError(f"{field} is {type(value).__name__}; expected an ISO 8601 string")
    try:
        parsed = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{field} {value[:40]!r} is not an ISO 8601 time; expected e.g. "
            "2024-05-01T12:00:00+00:00"
        ) from None
    if parsed.tzinfo is None:
        raise ValueError(f"{field} {value[:40]!r} has no UTC offset; expected e.g. +00:00")
    return parsed


def _read_job(path: Path) -> dict[str, Any]:
    """A job's state file, checked: a damaged one must not be run or served as a job, nor
    stop the service when retention or the restart reads its times and counters."""
    job = read_json(path)
    if not isinstance(job, dict) or any(not isinstance(job.get(k), str) for k in JOB_KEYS):
        raise ValueError(f"not a slide job (needs string fields {', '.join(JOB_KEYS)})")
    if job["id"] != path.parent.name or not JOB_ID.match(job["id"]):
        raise ValueError("its id is not its folder's name")
    _parse_time(job["created"], "created")
    if job.get("finished") is not None:
        _parse_time(job["finished"], "finished")
    for counter in ("attempts", "restarted"):
        value = job.get(counter, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{counter} is {str(value)[:40]!r}; expected a count (0 or more)")
    return job


def _tree_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder``, tolerating files and folders that vanish
    while it walks (atomic writes' temporary files, results that retention deletes)."""
    total = 0
    for parent, _, names in os.walk(folder):  # os.walk skips folders it cannot list
        for name in names:
            try:
                info = os.lstat(os.path.join(parent, name))
            except OSError:  # removed between the listing and here
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def _ended(job: dict[str, Any]) -> _dt.datetime:
    """When a job finished (or, never started, was created); times were checked on loading
    and are written by :func:`_now`, so only a job changed behind the service's back fails
    here, and it is kept rather than deleted."""
    try:
        return _parse_time(job.get("finished") or job["created"], "finished")
    except ValueError:
        return _dt.datetime.max.replace(tzinfo=_dt.timezone.utc)


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
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(
            max_workers=settings.max_running, thread_name_prefix="slide-job"
        )
        self._futures: set[Future[None]] = set()  # submitted and not ended: close waits for them
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
        self.expired = 0  # finished jobs whose results retention deleted
        self._last_expiry = -math.inf
        # read by /metrics on the event loop: walked here, on submit, when a job ends and
        # when retention deletes, never by the gauges themselves
        self._disk_used = 0
        self.expire()
        self.refresh_disk_bytes()
        for job in sorted(self._jobs.values(), key=lambda j: j["created"]):
            if job["status"] not in PENDING:
                continue
            attempts = int(job.get("attempts", 0))
            if job["status"] == "running" and attempts >= settings.max_attempts:
                # it was running when the service stopped, every time: a poison job
                job.update(
                    status="failed",
                    finished=_now(),
                    error=f"stopped its worker {attempts} times (killed, or the service "
                    "crashed); not run again",
                )
                self._save(job)
                continue
            job["status"], job["restarted"] = "queued", job.get("restarted", 0) + 1
            self._save(job)
            self._start(job["id"])

    def _start(self, job_id: str) -> None:
        future = self._pool.submit(self._run, job_id)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)

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
        """The slide a client names, checked by length and characters *before* any file-system
        call: a 600 KB name of ``a/a/a/...`` spent 18 s in ``Path.resolve``."""
        if not isinstance(slide, str) or not slide:
            raise JobError(422, 'name a slide: {"slide": "relative/path.svs", "model": ...}')
        try:  # strictly: a lone surrogate ("\ud800" in JSON) fails later in Path.resolve
            encoded = slide.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise JobError(
                422,
                f"slide name {shown(slide)} is not valid Unicode text (a lone surrogate at "
                f"character {exc.start}); expected a path of UTF-8 characters",
            ) from exc
        if len(encoded) > MAX_SLIDE_NAME:
            raise JobError(422, f"slide name longer than {MAX_SLIDE_NAME} bytes")
        parts = slide.split("/")
        if slide.startswith("/") or ".." in parts:
            raise JobError(403, "slides must be named relative to the slide root")
        if (
            len(parts) > MAX_SLIDE_DEPTH
            or UNPRINTABLE.search(slide)
            or any(not part or len(part.encode("utf-8")) > 255 for part in parts)
        ):
            raise JobError(
                422,
                f"slide name {shown(slide)}: '/'-separated parts of 1 to 255 bytes, no control "
                f"characters or backslashes, at most {MAX_SLIDE_DEPTH} parts",
            )
        if Path(slide).is_absolute() or ".." in parts:
            raise JobError(403, "slides must be named relative to the slide root")
        if Path(slide).suffix.lower() not in SLIDE_SUFFIXES:
            raise JobError(
                422, f"{shown(slide)} is not a slide file ({', '.join(sorted(SLIDE_SUFFIXES))})"
            )
        path = (self.root / slide).resolve()
        if not path.is_relative_to(self.root):  # a symlink out of the root
            raise JobError(403, "slides must be named relative to the slide root")
        if not path.is_file():
            raise JobError(404, f"no slide {shown(slide)} under the slide root")
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
        self.expire()
        used = self.refresh_disk_bytes()  # the quota needs the figure of now
        if used >= self.settings.disk_quota_bytes:
            raise JobError(
                507,
                f"slide job results use {used / 1e6:.0f} MB of their "
                f"{self.settings.disk_quota_bytes / 1e6:.0f} MB quota; try again once older "
                "results expire",
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
            # a copy: once the pool has it, the worker updates the stored dict while the
            # route turns this one into JSON
            view = dict(job)
        self._audit(view, "submitted")
        self._start(view["id"])
        return view

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
        except ServiceStopping:
            # a graceful stop (a deploy) is not a crash: not an attempt, queued for next start
            with self._lock:
                job = self._jobs[job_id]
                job.update(status="queued", attempts=max(int(job.get("attempts", 1)) - 1, 0))
                with contextlib.suppress(OSError):
                    self._save(job)
            self.refresh_disk_bytes()
        except Exception as exc:  # anything at all: a job must never stay "running"
            reason = self._public(_one_line(exc))
            self._end(job_id, {"status": "failed", "error": reason}, reason)

    def _end(self, job_id: str, ending: dict[str, Any], detail: str) -> None:
        """Publish a job's end, logged and measured first: a client that sees "done" or
        "failed" finds the audit row, and the disk gauge counts the job's files."""
        ending = {**ending, "finished": _now()}
        final = {**self._snapshot(job_id), **ending}
        self._audit(final, ending["status"], detail)
        with self._lock, contextlib.suppress(OSError):  # unsaved: a restart runs it again
            self._save(final)
        self.refresh_disk_bytes()
        with self._lock:
            self._jobs[job_id].update(ending)

    def _work(self, job_id: str) -> None:
        if self._stopping.is_set():
            raise ServiceStopping("the service is stopping")
        # the quota was checked on submit, but jobs queued together may fill it since
        used = self.refresh_disk_bytes()
        if used >= self.settings.disk_quota_bytes:
            raise JobBudgetExceeded(
                f"slide job results use {used / 1e6:.0f} MB of their "
                f"{self.settings.disk_quota_bytes / 1e6:.0f} MB quota; submit it again once "
                "older results expire"
            )
        attempts = int(self._snapshot(job_id).get("attempts", 0)) + 1
        job = self._update(job_id, status="running", started=_now(), attempts=attempts)
        entry = self.repository.get(job["model"], job["version"])
        deadline = time.monotonic() + self.settings.max_seconds

        def check() -> None:
            if self._stopping.is_set():
                raise ServiceStopping("the service is stopping")
            if time.monotonic() > deadline:
                raise JobBudgetExceeded(
                    f"the job ran past its {self.settings.max_seconds:g} s budget"
                )

        def progress(done: int, total: int) -> None:
            if total > self.settings.max_tiles:
                raise JobBudgetExceeded(
                    f"the slide has {total} tissue tiles, more than the {self.settings.max_tiles} "
                    "a job may classify"
                )
            self._progress(job_id, done, total)

        try:
            summary = classify_slide(
                self.root / job["slide"],
                entry.model,
                self.settings.jobs_dir / job_id,
                SlideSettings(),
                progress=False,
                on_progress=progress,
                check=check,
                # refused while the grid is walked, before a huge grid's tiles are held
                max_tiles=self.settings.max_tiles,
                # the slide as the client named it, not its path on this server; the served
                # name and version (a repository's folders), not the card's own labels
                rename={"slide": job["slide"], "model": entry.name, "model_version": entry.version},
            )
        except TileBudgetExceeded as exc:
            raise JobBudgetExceeded(
                f"the slide has at least {exc.found} tissue tiles, more than the {exc.limit} "
                "a job may classify"
            ) from exc
        counts = summary["class_counts"]
        result = {
            "tiles": summary["tiles"],
            "tissue_area_mm2": summary["tissue_area_mm2"],
            "class_counts": counts,
        }
        top = max(counts, key=counts.get) if summary["tiles"] else "no tissue"
        self._end(
            job_id,
            {"status": "done", "result": result},
            f"{summary['tiles']} tiles; most tiles: {top}",
        )

    def get(self, job_id: str) -> dict[str, Any]:
        """A copy of a job's state (the worker keeps updating the stored one).

        Runs retention first, at most every :data:`EXPIRE_EVERY_S` seconds: a service that
        takes no new jobs still deletes old results, and a lookup of an expired job is a 404.
        """
        if not JOB_ID.match(job_id):
            raise JobError(404, "no such slide job")
        if time.monotonic() - self._last_expiry >= EXPIRE_EVERY_S:
            self.expire()
        return self._snapshot(job_id)

    def _snapshot(self, job_id: str) -> dict[str, Any]:
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
            raise JobError(404, f"no output {shown(name)}; outputs: {', '.join(files)}")
        return files[name]

    def disk_bytes(self) -> int:
        """Bytes the jobs' folders hold (state and results), walked now.

        Not for the event loop: :meth:`gauges` reports the figure of the last walk.
        """
        return _tree_bytes(self.settings.jobs_dir)

    def refresh_disk_bytes(self) -> int:
        """Walk the jobs' folders and keep the figure for :meth:`gauges`; returns it."""
        self._disk_used = self.disk_bytes()
        return self._disk_used

    def expire(self) -> int:
        """Delete finished jobs older than the retention period (state and results); returns
        how many. Pending jobs are never touched."""
        self._last_expiry = time.monotonic()
        hours = self.settings.retention_hours
        if hours <= 0:
            return 0
        cutoff = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(hours=hours)
        with self._lock:
            old = [
                job_id
                for job_id, job in self._jobs.items()
                if job["status"] not in PENDING and _ended(job) < cutoff
            ]
            for job_id in old:
                del self._jobs[job_id]
            self.expired += len(old)
        for job_id in old:
            shutil.rmtree(self.settings.jobs_dir / job_id, ignore_errors=True)
        if old:
            self.refresh_disk_bytes()
        return len(old)

    def gauges(self) -> list[Gauge]:
        """Job counts by status, the longest run, disk use against the quota, results expired
        (for /metrics)."""
        with self._lock:
            counts = Counter(job["status"] for job in self._jobs.values())
            running = [j.get("started") for j in self._jobs.values() if j["status"] == "running"]
        now = _dt.datetime.now(_dt.timezone.utc)
        ages = [0.0]
        for started in running:
            with contextlib.suppress(ValueError):
                ages.append((now - _parse_time(started, "started")).total_seconds())
        return [
            *(
                ("histolite_slide_jobs", "Slide jobs by status.", (("status", s),), float(n))
                for s, n in sorted(counts.items())
            ),
            (
                "histolite_slide_jobs_longest_running_seconds",
                # past the job budget: stuck in a read the budget cannot interrupt
                "Seconds since the longest-running slide job started (0: none running).",
                (),
                max(ages),
            ),
            (
                "histolite_slide_jobs_disk_bytes",
                "Bytes of slide job state and results.",
                (),
                float(self._disk_used),
            ),
            (
                "histolite_slide_jobs_disk_quota_bytes",
                "Quota of slide job results.",
                (),
                float(self.settings.disk_quota_bytes),
            ),
            (
                "histolite_slide_jobs_retention_hours",
                "Finished jobs are deleted after this.",
                (),
                self.settings.retention_hours,
            ),
            (
                "histolite_slide_jobs_expired",
                "Finished jobs deleted by retention since start.",
                (),
                float(self.expired),
            ),
        ]

    def close(self, wait_s: float | None = None) -> None:
        """Stop: queued jobs stay queued on disk, a running one stops at its next check.

        Waits up to ``wait_s`` (default :data:`CLOSE_WAIT_S`) for the running job to get
        there and save its state, so the audit log closed after this is not written to any
        more; a job stuck in one read is not waited for longer (a restart queues it again).
        """
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            running = list(self._futures)
        wait_for(running, timeout=CLOSE_WAIT_S if wait_s is None else wait_s)
