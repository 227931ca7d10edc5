"""Several models and versions in one service, bag models with attention, and slide jobs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import mosaic_slide

from histolite.serve.app import ServeSettings, create_app
from histolite.serve.repository import is_safe_name, load_repository, version_key


def test_names_and_versions() -> None:
    assert sorted(["1", "10", "2", "1.10", "1.9"], key=version_key) == [
        "1",
        "1.9",
        "1.10",
        "2",
        "10",
    ]
    assert is_safe_name("kather-student_v2.1")
    for bad in ("..", "../x", "a/b", ".hidden", "", "x" * 65, "a b"):
        assert not is_safe_name(bad), bad


def test_a_broken_folder_is_reported_and_the_others_served(repository: Path) -> None:
    repo = load_repository(repository)
    assert repo.names() == ["bags", "tiles"]
    assert repo.default_version("tiles") == "10"  # newest, numerically
    assert "broken/1" in repo.broken and "not valid JSON" in repo.broken["broken/1"]
    # named inside the repository, not by the server's absolute path (audit of issue 14)
    assert repo.broken["broken/1"].startswith("broken/1/model.json: ")
    assert str(repository) not in repo.broken["broken/1"]


def _png(path: Path) -> bytes:
    return path.read_bytes()


def test_models_listing_and_versioned_prediction(
    repository: Path, tmp_path: Path, synthetic_dir: Path
) -> None:
    tile = sorted((synthetic_dir / "tumor").iterdir())[0]
    with TestClient(
        create_app(ServeSettings(model_dir=repository, audit_db=tmp_path / "a.db"))
    ) as c:
        listing = c.get("/v1/models").json()
        assert [m["name"] for m in listing["models"]] == ["bags", "tiles"]
        tiles = listing["models"][1]
        assert tiles["default_version"] == "10"
        assert [v["version"] for v in tiles["versions"]] == ["10", "2", "1"]
        assert "source_run" not in tiles["versions"][0]["card"]
        assert listing["unavailable"][0]["folder"] == "broken/1"
        assert str(repository) not in json.dumps(listing)
        files = {"files": (tile.name, _png(tile))}
        newest = c.post("/v1/models/tiles/predict", files=files).json()
        assert newest["model_version"] == "10" and newest["predictions"][0]["model"] == "tiles"
        pinned = c.post("/v1/models/tiles/versions/1/predict", files=files).json()
        assert pinned["model_version"] == "1"
        assert (
            pinned["predictions"][0]["probabilities"] == newest["predictions"][0]["probabilities"]
        )
        for path, status in (
            ("/v1/models/nope/predict", 404),
            ("/v1/models/tiles/versions/3/predict", 404),
            ("/v1/models/..%2F..%2Fetc/predict", 404),
            ("/v1/models/tiles/versions/..%2F1/predict", 404),
        ):
            response = c.post(path, files=files)
            assert response.status_code == status, (path, response.text)
        assert (
            "unknown model 'nope'"
            in c.post("/v1/models/nope/predict", files=files).json()["detail"]
        )


def test_bag_model_returns_attention_per_patch(
    repository: Path, tmp_path: Path, mosaic_bags: Path
) -> None:
    image = sorted((mosaic_bags / "positive").glob("*.png"))[0]
    with TestClient(
        create_app(ServeSettings(model_dir=repository, audit_db=tmp_path / "a.db"))
    ) as c:
        body = c.post("/v1/models/bags/predict", files={"files": (image.name, _png(image))}).json()
    (result,) = body["predictions"]
    assert result["patches"] is None and len(result["attention"]) == 4  # a 2 x 2 mosaic
    assert result["explanation"] is None  # attention explains a bag model
    assert sum(a["weight"] for a in result["attention"]) == pytest.approx(1.0, abs=1e-4)
    boxes = {(a["x"], a["y"], a["width"], a["height"]) for a in result["attention"]}
    assert boxes == {(0, 0, 32, 32), (32, 0, 32, 32), (0, 32, 32, 32), (32, 32, 32, 32)}
    assert set(result["probabilities"]) == {"negative", "positive"}


def _wait(client: TestClient, job: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/v1/slides/{job}").json()
        if state["status"] in ("done", "failed"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"slide job {job} did not finish")


def test_slide_jobs_run_in_the_background_and_survive_a_restart(
    repository: Path, tmp_path: Path, synthetic_dir: Path
) -> None:
    slides = tmp_path / "slides"
    tiles = [[np.asarray(Image.open(p)) for p in sorted((synthetic_dir / "tumor").iterdir())[:4]]]
    mosaic_slide(slides / "case" / "s1.tif", [[*row, None] for row in tiles], mpp=0.5)
    settings = ServeSettings(
        model_dir=repository,
        audit_db=tmp_path / "audit.db",
        slide_root=slides,
        jobs_dir=tmp_path / "jobs",
        slide_jobs_queued=2,
    )
    with TestClient(create_app(settings)) as c:
        for body, status in (
            ({"slide": "../outside.svs", "model": "tiles"}, 403),
            ({"slide": "/etc/passwd", "model": "tiles"}, 403),
            ({"slide": "case/missing.tif", "model": "tiles"}, 404),
            ({"slide": "case/s1.tif", "model": "nope"}, 404),
            ({"slide": "case/notes.txt", "model": "tiles"}, 422),
            ({"slide": "case/s1.tif", "model": "bags"}, 422),  # accepted, then failed: #4
            ({"model": "tiles"}, 422),
        ):
            response = c.post("/v1/slides", json=body)
            assert response.status_code == status, (body, response.text)
        bag = c.post("/v1/slides", json={"slide": "case/s1.tif", "model": "bags"}).json()
        assert "bag model" in bag["detail"] and "slide predict" in bag["detail"]
        submitted = c.post("/v1/slides", json={"slide": "case/s1.tif", "model": "tiles"})
        assert submitted.status_code == 202
        job = submitted.json()["id"]
        state = _wait(c, job)
        assert state["status"] == "done", state.get("error")
        assert (
            state["result"]["tiles"] > 0 and state["model"] == "tiles" and state["version"] == "10"
        )
        summary = c.get(state["links"]["summary"]).json()
        assert summary["tiles"] == state["result"]["tiles"]
        geojson = c.get(state["links"]["geojson"])
        assert geojson.json()["type"] == "FeatureCollection"
        assert c.get(state["links"]["heatmap"]).headers["content-type"] == "image/png"
        assert c.get(f"/v1/slides/{job}/files/../../audit.db").status_code == 404
        assert c.get("/v1/slides/not-a-job").status_code == 404
    # a restart: the finished job is still there; a job left queued runs again
    state_file = tmp_path / "jobs" / job / "job.json"
    pending = json.loads(state_file.read_text()) | {"id": "0" * 32, "status": "running"}
    (tmp_path / "jobs" / ("0" * 32)).mkdir()
    (tmp_path / "jobs" / ("0" * 32) / "job.json").write_text(json.dumps(pending))
    with TestClient(create_app(settings)) as c:
        assert c.get(f"/v1/slides/{job}").json()["status"] == "done"
        again = _wait(c, "0" * 32)
        assert again["status"] == "done" and again["restarted"] == 1
    import sqlite3

    db = sqlite3.connect(tmp_path / "audit.db")
    events = db.execute(
        "SELECT request_id, outcome FROM audit WHERE kind = 'slide_job' ORDER BY id"
    ).fetchall()
    assert (job, "submitted") in events and (job, "done") in events
    assert ("0" * 32, "done") in events


def test_a_full_queue_answers_429(repository: Path, tmp_path: Path, synthetic_dir: Path) -> None:
    slides = tmp_path / "slides"
    tiles = [[np.asarray(Image.open(p)) for p in sorted((synthetic_dir / "tumor").iterdir())[:4]]]
    mosaic_slide(slides / "s1.tif", tiles, mpp=0.5)
    settings = ServeSettings(
        model_dir=repository,
        audit_db=tmp_path / "audit.db",
        slide_root=slides,
        jobs_dir=tmp_path / "jobs",
        slide_jobs_queued=1,
    )
    with TestClient(create_app(settings)) as c:
        service = c.app.state.service  # type: ignore[attr-defined]
        gate = __import__("threading").Event()
        original = service.jobs._run
        service.jobs._run = lambda job_id: (gate.wait(30), original(job_id))
        first = c.post("/v1/slides", json={"slide": "s1.tif", "model": "tiles"})
        assert first.status_code == 202
        second = c.post("/v1/slides", json={"slide": "s1.tif", "model": "tiles"})
        assert second.status_code == 429 and "try again later" in second.json()["detail"]
        gate.set()
        assert _wait(c, first.json()["id"])["status"] == "done"


def test_attention_boxes_stay_inside_an_image_smaller_than_a_patch(
    repository: Path, tmp_path: Path
) -> None:
    """Regression: a 20 x 24 upload to a 32 px bag model got a 32 x 32 box."""
    small = tmp_path / "small.png"
    Image.fromarray(np.full((20, 24, 3), 180, np.uint8)).save(small)
    with TestClient(
        create_app(ServeSettings(model_dir=repository, audit_db=tmp_path / "a.db"))
    ) as c:
        body = c.post("/v1/models/bags/predict", files={"files": (small.name, _png(small))})
    (result,) = body.json()["predictions"]
    (box,) = result["attention"]
    assert (box["x"], box["y"], box["width"], box["height"]) == (0, 0, 24, 20)


def test_served_cards_carry_no_paths_of_the_exporting_machine(tmp_path: Path) -> None:
    """Found in review: the stain target's absolute path (card["stain"]["source"]) was served."""
    from types import SimpleNamespace

    from histolite.serve.repository import ModelEntry

    card = {
        "source_run": "/home/lab/runs/kather",
        "stain": {"method": "reinhard", "source": "/home/lab/configs/stain/target.json"},
    }
    entry = ModelEntry("m", "1", tmp_path, SimpleNamespace(card=card))  # type: ignore[arg-type]
    public = entry.public_card()
    assert "source_run" not in public and "/home/lab" not in json.dumps(public)
    assert public["stain"]["source"] == "target.json"
    assert card["stain"]["source"].startswith("/home/lab")  # the card itself is untouched
