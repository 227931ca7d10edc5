"""Slide jobs that go wrong: unexpected errors, damaged state files, what results and errors say.

Each test fails on the code before its fix (audit of issue 14): a job left "running" forever, a
service that would not start, summaries naming the card instead of the served model, and
absolute server paths in messages.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import mosaic_slide

import histolite.serve.slide_jobs as slide_jobs
from histolite.serve.app import ServeSettings, create_app


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
