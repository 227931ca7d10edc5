"""Slide jobs that go wrong: unexpected errors, damaged state files, what results and errors say.

Each test fails on the code before its fix (audit of issue 14): a job left "running" forever, a
service that would not start, summaries naming the card instead of the served model, and
absolute server paths in messages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import mosaic_slide

import histolite.serve.slide_jobs as slide_jobs
from histolite.serve.app import ServeSettings, create_app
from histolite.serve.slide_jobs import SlideJobs, SlideJobSettings


@pytest.fixture
def settings(repository: Path, tmp_path: Path, synthetic_dir: Path) -> ServeSettings:
    slides = tmp_path / "slides"
    tiles = [[np.asarray(Image.open(p)) for p in sorted((synthetic_dir / "tumor").iterdir())[:3]]]
    mosaic_slide(slides / "case" / "s1.tif", tiles, mpp=0.5)
    (slides / "case" / "bad.tif").write_bytes(b"not a slide at all")
    return ServeSettings(
        model_dir=repository,
        audit_db=tmp_path / "audit.db",
        slide_root=slides,
        jobs_dir=tmp_path / "jobs",
    )


def _finish(client: TestClient, slide: str) -> dict:
    submitted = client.post("/v1/slides", json={"slide": slide, "model": "tiles"})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = client.get(f"/v1/slides/{job}").json()
        if state["status"] not in ("queued", "running"):
            return state
        time.sleep(0.1)
    raise AssertionError(f"slide job {job} is still {state['status']}")


def _events(db: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT request_id, outcome, detail FROM audit WHERE kind = 'slide_job' ORDER BY id"
        ).fetchall()


def test_an_unexpected_error_fails_the_job_in_one_audited_line(
    settings: ServeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of shared memory\nTraceback line that must not show")

    monkeypatch.setattr(slide_jobs, "classify_slide", crash)
    with TestClient(create_app(settings)) as c:
        state = _finish(c, "case/s1.tif")
    assert state["status"] == "failed" and "finished" in state
    assert state["error"] == "RuntimeError: out of shared memory"
    assert (state["id"], "failed", "RuntimeError: out of shared memory") in _events(
        settings.audit_db  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("crashes", [False, True], ids=["done", "failed"])
def test_a_finished_job_is_in_the_audit_log_before_its_state_says_so(
    settings: ServeSettings, monkeypatch: pytest.MonkeyPatch, crashes: bool
) -> None:
    """CI once read "failed" from the job page before the worker had written its audit row;
    the disk gauge was walked after the end was shown as well."""
    if crashes:

        def crash(*args: object, **kwargs: object) -> None:
            raise RuntimeError("disk full")

        monkeypatch.setattr(slide_jobs, "classify_slide", crash)
    with TestClient(create_app(settings)) as c:
        audit = c.app.state.service.jobs.audit  # type: ignore[attr-defined]
        record = audit.record_job

        def slow_record(**kwargs: Any) -> None:
            if kwargs["event"] != "submitted":
                time.sleep(1.0)  # a busy log: the page must not run ahead of it
            record(**kwargs)

        monkeypatch.setattr(audit, "record_job", slow_record)
        jobs = c.app.state.service.jobs  # type: ignore[attr-defined]
        walk = jobs.disk_bytes

        def slow_walk() -> int:
            time.sleep(0.5)  # a big results folder: the page must not run ahead of the gauge
            return walk()

        monkeypatch.setattr(jobs, "disk_bytes", slow_walk)
        state = _finish(c, "case/s1.tif")
        outcomes = [e[1] for e in _events(settings.audit_db) if e[0] == state["id"]]  # type: ignore[arg-type]
        gauge = {g[0]: g[3] for g in jobs.gauges()}["histolite_slide_jobs_disk_bytes"]
        assert gauge == walk()  # every file of the ended job, its final state file included
    assert outcomes == ["submitted", state["status"]]
    assert state["status"] == ("failed" if crashes else "done")


def test_a_damaged_job_file_is_skipped_and_reported(
    settings: ServeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(create_app(settings)) as c:
        done = _finish(c, "case/s1.tif")
    assert settings.jobs_dir is not None
    for name, text in (("a" * 32, "{not json"), ("b" * 32, '["a list"]')):
        (settings.jobs_dir / name).mkdir()
        (settings.jobs_dir / name / "job.json").write_text(text)
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings)) as c:
        assert c.get(f"/v1/slides/{done['id']}").json()["status"] == "done"
        assert c.get(f"/v1/slides/{'a' * 32}").status_code == 404
        jobs = c.app.state.service.jobs  # type: ignore[attr-defined]
        assert sorted(jobs.broken) == ["a" * 32, "b" * 32]
        assert "not valid JSON" in jobs.broken["a" * 32]
        assert str(settings.jobs_dir) not in json.dumps(jobs.broken)
    assert f"skipped slide job {'a' * 32}" in caplog.text


def test_summary_names_the_served_model_and_the_slide_as_named(settings: ServeSettings) -> None:
    with TestClient(create_app(settings)) as c:
        state = _finish(c, "case/s1.tif")
        summary = c.get(state["links"]["summary"]).json()
    assert state["status"] == "done", state.get("error")
    # the card says name "run", version "1": the repository serves it as tiles v10
    assert (summary["model"], summary["model_version"]) == ("tiles", "10")
    assert summary["slide"] == "case/s1.tif"


def test_job_errors_name_slides_relative_to_the_slide_root(settings: ServeSettings) -> None:
    with TestClient(create_app(settings)) as c:
        state = _finish(c, "case/bad.tif")
    assert state["status"] == "failed"
    assert "case/bad.tif" in state["error"], state["error"]
    for folder in (settings.slide_root, settings.jobs_dir):
        assert folder is not None and str(folder.resolve()) not in state["error"]
    assert all(str(settings.slide_root) not in (d or "") for *_, d in _events(settings.audit_db))  # type: ignore[arg-type]


# ---------------------------------------------------------------- review findings D, G, H
class _Repository:
    """One tile classifier, ``tiles`` v1: enough for the queue, which never runs it here."""

    def get(self, name: str | None = None, version: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(name="tiles", version="1", model=SimpleNamespace(is_bag_model=False))


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Callable[..., SlideJobs]]:
    """``queue(**settings)``: a SlideJobs over ``slides/s.tif`` and ``jobs/``, closed after."""
    made: list[SlideJobs] = []

    def make(**settings: Any) -> SlideJobs:
        slides = tmp_path / "slides"
        slides.mkdir(exist_ok=True)
        (slides / "s.tif").write_bytes(b"II*\x00")
        jobs = SlideJobs(
            SlideJobSettings(slides, tmp_path / "jobs", **settings),
            _Repository(),  # type: ignore[arg-type]
        )
        made.append(jobs)
        return jobs

    yield make
    for jobs in made:
        jobs.close()


def _write_job(jobs_dir: Path, job_id: str, **fields: Any) -> None:
    state = {"id": job_id, "slide": "s.tif", "model": "tiles", "version": "1",
             "status": "done", "created": "2024-05-01T12:00:00+00:00", **fields}  # fmt: skip
    (jobs_dir / job_id).mkdir(parents=True, exist_ok=True)
    (jobs_dir / job_id / "job.json").write_text(json.dumps(state))


def test_a_slide_name_with_a_lone_surrogate_is_a_422(settings: ServeSettings) -> None:
    """Finding D: the length check encoded with surrogatepass, so the name reached
    Path.resolve, whose UnicodeEncodeError was a 500."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for slide in ("a\ud800.svs", "case/\udcff.tif"):
            body = json.dumps({"slide": slide, "model": "tiles"})  # ASCII JSON: "\ud800"
            response = c.post(
                "/v1/slides", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 422, response.text
            assert "lone surrogate" in response.json()["detail"]
    with sqlite3.connect(settings.audit_db) as con:  # type: ignore[arg-type]
        outcomes = [row[0] for row in con.execute("SELECT outcome FROM audit ORDER BY id")]
    assert outcomes == ["rejected 422", "rejected 422"]


def test_submit_returns_a_copy_that_the_worker_does_not_change(
    queue: Callable[..., SlideJobs], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding G: submit returned the stored dict, which the worker updates while the route
    turns it into JSON ("dictionary changed size during iteration")."""
    running = threading.Event()

    def run(self: SlideJobs, job_id: str) -> None:
        self._update(job_id, status="running", started="now")
        running.set()

    monkeypatch.setattr(SlideJobs, "_run", run)
    jobs = queue()
    job = jobs.submit("s.tif", None, None, "10.0.0.1")
    assert running.wait(10)
    assert job["status"] == "queued" and "started" not in job  # as it was when submitted
    assert jobs.get(job["id"])["status"] == "running"


class _ListThenVanish:
    """``os.scandir`` whose listing is taken before ``doomed`` is deleted: what a walk sees
    when an atomic write renames its temporary file between the listing and the stat."""

    def __init__(self, real: Callable[..., Any], doomed: Path) -> None:
        self.real, self.doomed = real, doomed
        self.raced = False  # the file was listed, then deleted

    def __call__(self, path: Any = ".") -> Any:
        with self.real(path) as listing:
            entries = list(listing)
        if Path(path) == self.doomed.parent:
            self.raced = any(entry.name == self.doomed.name for entry in entries)
            self.doomed.unlink()
        return _Entries(entries)


class _Entries:
    def __init__(self, entries: list[os.DirEntry]) -> None:
        self.entries = iter(entries)

    def __enter__(self) -> _Entries:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __iter__(self) -> _Entries:
        return self

    def __next__(self) -> os.DirEntry:
        return next(self.entries)

    def close(self) -> None:
        pass


def test_disk_use_tolerates_files_that_vanish_while_it_walks(
    queue: Callable[..., SlideJobs], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding H: a job.json.tmp listed, then renamed before its stat, was a FileNotFoundError
    and a 500 from /metrics."""
    jobs = queue()
    _write_job(tmp_path / "jobs", "c" * 32)
    kept = (tmp_path / "jobs" / ("c" * 32) / "job.json").stat().st_size
    doomed = tmp_path / "jobs" / ("c" * 32) / "job.json.tmp"
    doomed.write_bytes(b"\0" * 1000)
    scandir = _ListThenVanish(os.scandir, doomed)
    monkeypatch.setattr(os, "scandir", scandir)
    assert jobs.disk_bytes() == kept
    assert scandir.raced and not doomed.exists()


def test_gauges_report_the_last_walk_and_never_walk_themselves(
    queue: Callable[..., SlideJobs], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding H: /metrics, on the event loop, walked every job's results on each scrape."""
    walks: list[int] = []
    real = SlideJobs.disk_bytes

    def counted(self: SlideJobs) -> int:
        walks.append(1)
        return real(self)

    def work(self: SlideJobs, job_id: str) -> None:  # the job writes its results
        (self.settings.jobs_dir / job_id / "tiles.csv").write_bytes(b"\0" * 5000)
        self._end(job_id, {"status": "done"}, "fake")

    monkeypatch.setattr(SlideJobs, "disk_bytes", counted)
    monkeypatch.setattr(SlideJobs, "_work", work)
    jobs = queue()

    def disk_gauge() -> float:
        found = [g[3] for g in jobs.gauges() if g[0] == "histolite_slide_jobs_disk_bytes"]
        return found[0]

    walks.clear()
    assert [disk_gauge() for _ in range(5)] == [0.0] * 5 and walks == []
    job = jobs.submit("s.tif", None, None, None)
    deadline = time.monotonic() + 10
    while disk_gauge() < 5000 and time.monotonic() < deadline:
        time.sleep(0.02)  # the worker walks once its job has ended
    assert jobs.get(job["id"])["status"] == "done"
    assert disk_gauge() == jobs.disk_bytes() >= 5000


def test_lookups_run_retention_at_most_once_a_minute(
    queue: Callable[..., SlideJobs], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention ran at start-up and on submit only: a service taking no new jobs kept old
    results for good. Lookups run it too, rate-limited (it lists every job)."""
    old = "d" * 32
    two_hours_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    _write_job(tmp_path / "jobs", old, finished=two_hours_ago.isoformat(timespec="seconds"))
    jobs = queue(retention_hours=3.0)
    assert jobs.get(old)["status"] == "done"  # within retention
    jobs.settings = dataclasses.replace(jobs.settings, retention_hours=1.0)  # an hour later
    assert jobs.get(old)["status"] == "done"  # retention ran less than a minute ago
    monkeypatch.setattr(slide_jobs, "EXPIRE_EVERY_S", 0.0)  # a minute later
    with pytest.raises(slide_jobs.JobError, match="no such slide job"):
        jobs.get(old)
    assert not (tmp_path / "jobs" / old).exists() and jobs.expired == 1


def test_damaged_times_and_counters_are_skipped_not_fatal(
    queue: Callable[..., SlideJobs], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fromisoformat on a damaged job.json raised in the constructor (and a naive time in
    the comparison with the cutoff): the service did not start."""
    folder = tmp_path / "jobs"
    good, words, naive, counter = "e" * 32, "f" * 32, "1" * 32, "2" * 32
    _write_job(folder, good, finished="2024-05-01T13:00:00+00:00")
    _write_job(folder, words, created="yesterday")
    _write_job(folder, naive, finished="2024-05-01T13:00:00")
    _write_job(folder, counter, attempts="twice")
    with caplog.at_level(logging.WARNING):
        jobs = queue(retention_hours=0.0)
    assert jobs.get(good)["status"] == "done"
    assert sorted(jobs.broken) == sorted([words, naive, counter])
    assert "created 'yesterday' is not an ISO 8601 time" in jobs.broken[words]
    assert "finished '2024-05-01T13:00:00' has no UTC offset" in jobs.broken[naive]
    assert "attempts is 'twice'; expected a count" in jobs.broken[counter]
    assert f"skipped slide job {naive}" in caplog.text
    for job_id in (words, naive, counter):  # kept on disk for someone to look at
        assert (folder / job_id / "job.json").is_file()
    assert queue(retention_hours=24.0).expired == 1  # and retention runs past them


def test_a_job_stuck_past_its_budget_shows_in_the_longest_running_gauge(
    queue: Callable[..., SlideJobs], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget is checked between reads: one read that hangs (a stalled network share) is
    not interrupted, so the operator needs the job's age to alert on."""
    gate = threading.Event()
    monkeypatch.setattr(slide_jobs, "classify_slide", lambda *a, **k: gate.wait(30))
    two_minutes_ago = datetime.now(timezone.utc) - timedelta(minutes=2)
    monkeypatch.setattr(slide_jobs, "_now", lambda: two_minutes_ago.isoformat(timespec="seconds"))
    jobs = queue()

    def longest() -> float:
        gauges = {g[0]: g[3] for g in jobs.gauges()}
        return gauges["histolite_slide_jobs_longest_running_seconds"]

    assert longest() == 0.0
    job = jobs.submit("s.tif", None, None, None)
    deadline = time.monotonic() + 10
    while jobs.get(job["id"])["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert 120.0 <= longest() < 180.0
    gate.set()


def test_a_stop_waits_for_the_running_job_to_save_its_state(
    settings: ServeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() returned at once: the audit log was closed under a job still running, and
    job.json said "running" after the service had stopped (so the restart counted an attempt
    against a job that a deploy, not a crash, had interrupted)."""
    started = threading.Event()

    def classify(*args: Any, check: Callable[[], None], **kwargs: Any) -> None:
        started.set()
        while True:  # a long slide: the budget and the stop are checked between batches
            time.sleep(0.3)
            check()

    monkeypatch.setattr(slide_jobs, "classify_slide", classify)
    with TestClient(create_app(settings)) as c:
        job = c.post("/v1/slides", json={"slide": "case/s1.tif", "model": "tiles"}).json()["id"]
        assert started.wait(30)
    assert settings.jobs_dir is not None
    state = json.loads((settings.jobs_dir / job / "job.json").read_text())
    assert state["status"] == "queued" and state["attempts"] == 0
