"""Every request does bounded work (issue 25): each test fails on the code before its fix.

JSON bodies parsed without a bound, names resolved before they were checked and echoed whole,
unbounded attention-MIL bags, IPv6 forms of private addresses, bodies and request heads that
stall forever, slide jobs without time, tile or disk budgets, and refusals that left no row in
the audit log.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import socket
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support import mosaic_slide, running_uvicorn

from histolite.serve.app import ServeSettings, create_app
from histolite.serve.fetch import is_public_address


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _audit_rows(tmp_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / "audit.db") as db:
        return list(db.execute("SELECT outcome, detail FROM audit WHERE kind = 'request'"))


def test_json_bodies_are_bounded_before_parsing(repository: Path, tmp_path: Path) -> None:
    """25 MB of nested empty objects was parsed on the event loop (3.9 GB, /healthz 12 s)."""
    (tmp_path / "slides").mkdir()
    client = _slide_service(repository, tmp_path)
    padded = '{"pad": [' + ",".join(["{}"] * 50_000) + '], "url": 1}'
    for path in ("/v1/predict", "/v1/slides"):
        response = client.post(path, content=padded, headers={"content-type": "application/json"})
        assert response.status_code == 413 and "16384 bytes" in response.json()["detail"]
    streamed = client.post(
        "/v1/predict",
        content=iter([b'{"url": "', b"x" * 20_000, b'"}']),  # no content-length: counted
        headers={"content-type": "application/json"},
    )
    assert streamed.status_code == 413
    long_url = client.post("/v1/predict", json={"url": "http://example.org/" + "a" * 5000})
    assert long_url.status_code == 422 and "2048" in long_url.json()["detail"]


def test_deeply_nested_json_is_a_422_not_a_500(repository: Path, tmp_path: Path) -> None:
    """Review finding C: 3 KB of "[" raised RecursionError in json.loads, which the handler
    (catching ValueError) let through as a 500 and an "error 500" audit row."""
    (tmp_path / "slides").mkdir()
    nested = b"[" * 3000
    with _slide_service(repository, tmp_path) as client:
        for path in ("/v1/predict", "/v1/slides"):
            response = client.post(
                path, content=nested, headers={"content-type": "application/json"}
            )
            assert response.status_code == 422, (path, response.text)
            assert "nested too deeply" in response.json()["detail"]
    outcomes = [outcome for outcome, _ in _audit_rows(tmp_path)]
    assert outcomes == ["rejected 422", "rejected 422"]


def test_names_are_checked_first_and_never_echoed_whole(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 600 KB name of "a/a/a/..." spent 18.5 s in Path.resolve: a refused name must never
    reach the file system (spied, not timed), and the refusal never echoes it whole."""
    deep_name, long_name, no_suffix_name, control_name = (
        "a/" * 7000 + "x.tif",
        "a" * 256 + ".tif",
        "b" * 10_000,
        "a\x01.tif",
    )
    refused = (deep_name, long_name, no_suffix_name, control_name)
    resolved: list[str] = []  # every path resolved while the requests ran
    real_resolve, real_realpath = Path.resolve, os.path.realpath

    def resolve(self: Path, *args: Any, **kwargs: Any) -> Path:
        resolved.append(str(self))
        return real_resolve(self, *args, **kwargs)

    def realpath(path: Any, *args: Any, **kwargs: Any) -> Any:
        resolved.append(os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path))
        return real_realpath(path, *args, **kwargs)

    settings = ServeSettings(
        model_dir=repository,
        audit_db=tmp_path / "audit.db",
        slide_root=tmp_path / "slides",
        jobs_dir=tmp_path / "jobs",
    )
    (tmp_path / "slides").mkdir()
    with TestClient(create_app(settings)) as c:
        monkeypatch.setattr(Path, "resolve", resolve)  # after start-up: its own paths resolve
        monkeypatch.setattr(os.path, "realpath", realpath)  # what Path.resolve spends time in
        deep = c.post("/v1/slides", json={"slide": deep_name, "model": "tiles"})
        assert deep.status_code == 422 and len(deep.text) < 400
        long = c.post("/v1/slides", json={"slide": long_name, "model": "tiles"})
        assert long.status_code == 422  # was a 500: ENAMETOOLONG
        no_suffix = c.post("/v1/slides", json={"slide": no_suffix_name, "model": "tiles"})
        assert no_suffix.status_code == 422 and len(no_suffix.text) < 400
        control = c.post("/v1/slides", json={"slide": control_name, "model": "tiles"})
        assert control.status_code == 422
        touched = [name[:40] for name in refused if any(name in path for path in resolved)]
        assert touched == [], "refused slide names reached Path.resolve (18.5 s before)"
        model = c.post("/v1/models/" + "m" * 7_000 + "/predict", files={"files": ("a", b"x")})
        assert model.status_code == 404 and len(model.text) < 400


def test_ipv6_forms_of_private_addresses_are_refused() -> None:
    for address in ("2002:a9fe:a9fe::1", "2002:7f00:1::", "2002:0a00:0001::5", "fec0::1"):
        assert not is_public_address(address), address
    assert is_public_address("2002:0808:0808::1")  # 6to4 of a public address
    assert is_public_address("2606:4700:4700::1111")


def test_bag_models_bound_their_patches_and_stream_them_in_chunks(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 40 KB 3000 x 3000 PNG took a bag model's server to 2.3 GB: the card bounds the bag,
    and the patches go through the instance graph a chunk at a time."""
    from histolite.runtime.classifier import OnnxClassifier

    model = OnnxClassifier(repository / "bags" / "1", max_batch=4)
    assert model.mil_head is not None and model.card["format_version"] == 3
    calls: list[int] = []
    real = model.session.run
    monkeypatch.setattr(
        model.session,
        "run",
        lambda names, feed: (calls.append(len(feed["patches"])), real(names, feed))[1],
    )
    side = model.patch_size * 5
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    prediction = model.predict(pixels)
    assert len(prediction.attention or []) == sum(calls) and max(calls) <= 4
    assert abs(sum(w for _, _, w in prediction.attention or []) - 1.0) < 1e-4
    card = model.card["mil"]
    assert card["max_image_pixels"] == card["max_instances"] * model.stride**2
    with TestClient(
        create_app(ServeSettings(model_dir=repository, audit_db=tmp_path / "audit.db"))
    ) as c:
        too_big = int(np.sqrt(card["max_image_pixels"])) + model.stride
        huge = _png(np.full((too_big, too_big, 3), 230, np.uint8))
        response = c.post("/v1/models/bags/predict", files={"files": ("big.png", huge)})
        assert response.status_code == 413 and "at most" in response.json()["detail"]


def test_a_stalled_body_is_a_408(repository: Path, tmp_path: Path) -> None:
    from histolite.serve.middleware import BodyLimit

    async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []

    async def receive() -> dict:
        if not sent:
            sent.append({})
            return {"type": "http.request", "body": b"x", "more_body": True}
        await asyncio.sleep(10)  # the client stops sending
        return {"type": "http.request", "body": b"", "more_body": False}

    responses: list[dict] = []

    async def send(message: dict) -> None:
        responses.append(message)

    limited = BodyLimit(app, limit=1000, read_timeout=0.2)  # type: ignore[arg-type]
    asyncio.run(limited({"type": "http", "headers": []}, receive, send))  # type: ignore[arg-type]
    # without the stall timeout the body would end after 10 s, and the app answer 200
    assert responses[0]["status"] == 408
    assert b"stalled for more than 0.2 s" in responses[1]["body"]


def test_a_body_trickling_under_the_stall_timeout_is_cut_off_in_all(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding I: a byte every 29 s never tripped the 30 s stall timeout, so the
    request was held for as long as the client liked; the body now has a deadline in all.

    The middleware's clock is a fake one that each chunk advances by 1 s (3 s is a stall), so
    the cut comes after exactly 5 chunks, whatever the machine's load.
    """
    import histolite.serve.middleware as middleware
    from histolite.serve.middleware import BodyLimit

    clock = 0.0  # only BodyLimit's deadlines read it; asyncio keeps the real clock
    monkeypatch.setattr(
        middleware, "time", SimpleNamespace(monotonic=lambda: clock, perf_counter=time.perf_counter)
    )

    async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = 0

    async def receive() -> dict:
        nonlocal chunks, clock
        clock += 1.0  # a byte a second: well within the 3 s stall timeout
        chunks += 1
        # done only after 50 s: without the deadline in all the app answers 200
        return {"type": "http.request", "body": b"x", "more_body": chunks < 50}

    responses: list[dict] = []

    async def send(message: dict) -> None:
        responses.append(message)

    limited = BodyLimit(app, limit=10**6, read_timeout=3.0, total_timeout=5.0)  # type: ignore[arg-type]
    asyncio.run(limited({"type": "http", "headers": []}, receive, send))  # type: ignore[arg-type]
    assert responses[0]["status"] == 408
    assert b"more than 5 s in all (5 bytes received)" in responses[1]["body"]
    assert chunks == 5  # 5 s of chunks, then the deadline: not one more asked for
    # the setting reaches the middleware
    settings = ServeSettings(model_dir=repository, audit_db=None, body_total_timeout=7.5)
    wired = [m.kwargs for m in create_app(settings).user_middleware if m.cls is BodyLimit]
    assert [kwargs["total_timeout"] for kwargs in wired] == [7.5]


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slowloris: uvicorn held a connection that dribbled its headers for as long as it liked.

    The head goes a byte every 0.05 s at least, so all of it takes 8 s or more, 16 times the
    0.5 s head timeout set here: the server must close the connection before the head is
    complete, which no wall-clock bound needs to say. 8 s is less than the 10 s default, so
    a server that ignored the setting would read the whole head too.
    """
    from histolite.serve.protocol import HEAD_TIMEOUT_S, PROTOCOL_PATH

    settings = ServeSettings(model_dir=repository, audit_db=None, head_timeout=0.5)
    for name, value in settings.to_env().items():  # as `histolite serve` hands them on
        monkeypatch.setenv(name, value)
    pause = 0.05  # s, at least, between two bytes of the head
    size = int(0.8 * HEAD_TIMEOUT_S / pause)  # 160 bytes: 8 s or more
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
    head += b"a" * (size - len(head) - 4) + b"\r\n\r\n"
    assert len(head) * pause >= 16 * settings.head_timeout
    with running_uvicorn(create_app(settings), http=PROTOCOL_PATH) as (base_url, _):
        address = ("127.0.0.1", urlsplit(base_url).port)
        with socket.create_connection(address, timeout=5) as slow:
            sent, closed, answer = 0, False, b""
            while sent < len(head):
                try:
                    slow.send(head[sent : sent + 1])
                except OSError:  # the reset from the closed end
                    closed = True
                    break
                sent += 1
                # the pause between bytes, cut short by anything from the server
                if select.select([slow], [], [], pause)[0]:
                    try:
                        answer = slow.recv(1000)
                    except OSError:  # reset
                        answer = b""
                    closed = answer == b""  # end of stream; else the server answered
                    break
            assert closed and sent < len(head), (
                f"after {sent} of the head's {len(head)} bytes the connection was "
                f"{'closed' if closed else 'open'}; the server sent {answer[:60]!r}"
            )
        with socket.create_connection(address, timeout=5) as quick:
            quick.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in quick.recv(1000)  # a normal request is not affected


def test_the_service_config_pickles_for_worker_processes() -> None:
    """`serve --workers 2` crashed: uvicorn pickles its config, and a class made with type()
    does not pickle."""
    import pickle

    import uvicorn

    from histolite.serve.protocol import PROTOCOL_PATH, BoundedH11Protocol

    config = uvicorn.Config(
        "histolite.serve.app:create_app_from_env", factory=True, http=PROTOCOL_PATH, workers=2
    )
    restored = pickle.loads(pickle.dumps(config))
    assert uvicorn.importer.import_from_string(restored.http) is BoundedH11Protocol


def _slide_service(repository: Path, tmp_path: Path, **settings: object) -> TestClient:
    return TestClient(
        create_app(
            ServeSettings(
                model_dir=repository,
                audit_db=tmp_path / "audit.db",
                slide_root=tmp_path / "slides",
                jobs_dir=tmp_path / "jobs",
                **settings,  # type: ignore[arg-type]
            )
        )
    )


def _wait(client: TestClient, job: str) -> dict:
    for _ in range(300):
        state = client.get(f"/v1/slides/{job}").json()
        if state["status"] not in ("queued", "running"):
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not finish")


def test_slide_jobs_have_tile_and_disk_budgets(
    repository: Path, tmp_path: Path, synthetic_dir: Path
) -> None:
    tiles = [[np.asarray(Image.open(p)) for p in sorted((synthetic_dir / "tumor").iterdir())[:3]]]
    mosaic_slide(tmp_path / "slides" / "s1.tif", tiles, mpp=0.5)
    with _slide_service(repository, tmp_path, slide_job_max_tiles=2) as c:
        job = c.post("/v1/slides", json={"slide": "s1.tif", "model": "tiles"}).json()["id"]
        state = _wait(c, job)
        assert (
            state["status"] == "failed" and "more than the 2 a job may classify" in state["error"]
        )
    with _slide_service(repository, tmp_path, slide_jobs_disk_quota_mb=1) as c:
        (tmp_path / "jobs" / "ballast").write_bytes(b"\0" * (2 * 1024**2))
        full = c.post("/v1/slides", json={"slide": "s1.tif", "model": "tiles"})
        assert full.status_code == 507 and "quota" in full.json()["detail"]
        metrics = c.get("/metrics").text
        assert "histolite_slide_jobs_disk_bytes" in metrics
        assert "histolite_slide_jobs_disk_quota_bytes 1.04858e+06" in metrics


class _HugeSlide:
    """A slide declaring one 100,000 x 100,000 level (what a 307 KB sparse TIFF can say)."""

    def __init__(self, path: Path) -> None:
        from histolite.slide.reader import SlideInfo

        side = 100_000
        self.info = SlideInfo(path, side, side, ((side, side),), (1.0,), 0.5, "test", "test")
        self.reads = 0

    def read_level(self, *args: object) -> np.ndarray:
        self.reads += 1
        raise AssertionError("the level must not be decoded")

    def close(self) -> None:
        pass


def test_a_huge_single_level_slide_is_refused_not_decoded(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file declaring one 100,000 x 100,000 level held the service's only worker for good."""
    import histolite.slide.inference as inference
    from histolite.slide.reader import SlideError
    from histolite.slide.tiles import plan_tissue_tiles

    fake = _HugeSlide(tmp_path / "huge.tif")
    with pytest.raises(SlideError, match=r"100000 x 100000 pixels \(10.0 Gpx"):
        plan_tissue_tiles(fake, 112.0)  # type: ignore[arg-type]
    assert fake.reads == 0
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "huge.tif").write_bytes(b"II*\x00")  # opened by the fake below
    monkeypatch.setattr(inference, "open_slide", lambda path, mpp=None: _HugeSlide(path))
    with _slide_service(repository, tmp_path) as c:
        started = time.perf_counter()
        job = c.post("/v1/slides", json={"slide": "huge.tif", "model": "tiles"}).json()["id"]
        state = _wait(c, job)
        assert state["status"] == "failed" and "Gpx" in state["error"]
        assert time.perf_counter() - started < 10


def test_slide_jobs_time_budget_stops_the_work(
    repository: Path, tmp_path: Path, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import histolite.serve.slide_jobs as slide_jobs

    tiles = [[np.asarray(Image.open(p)) for p in sorted((synthetic_dir / "tumor").iterdir())[:3]]]
    mosaic_slide(tmp_path / "slides" / "s1.tif", tiles, mpp=0.5)
    real = slide_jobs.classify_slide

    def slow(*args: object, **kwargs: object) -> dict:
        time.sleep(0.3)  # the deadline passes before the first check
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(slide_jobs, "classify_slide", slow)
    with _slide_service(repository, tmp_path, slide_job_max_seconds=0.1) as c:
        job = c.post("/v1/slides", json={"slide": "s1.tif", "model": "tiles"}).json()["id"]
        state = _wait(c, job)
    assert state["status"] == "failed" and "0.1 s budget" in state["error"]


def test_poison_jobs_and_retention(repository: Path, tmp_path: Path, synthetic_dir: Path) -> None:
    """A job found running at start-up twice is failed, not re-queued; old results expire."""
    tiles = [[np.asarray(Image.open(p)) for p in sorted((synthetic_dir / "tumor").iterdir())[:3]]]
    mosaic_slide(tmp_path / "slides" / "s1.tif", tiles, mpp=0.5)
    jobs = tmp_path / "jobs"
    poison, old = "a" * 32, "b" * 32
    for job_id, extra in (
        (poison, {"status": "running", "attempts": 2}),
        (old, {"status": "done", "finished": "2020-01-01T00:00:00+00:00"}),
    ):
        (jobs / job_id).mkdir(parents=True)
        state = {"id": job_id, "slide": "s1.tif", "model": "tiles", "version": "10",
                 "created": "2020-01-01T00:00:00+00:00", **extra}  # fmt: skip
        (jobs / job_id / "job.json").write_text(json.dumps(state))
    with _slide_service(repository, tmp_path, slide_jobs_retention_hours=24) as c:
        failed = c.get(f"/v1/slides/{poison}").json()
        assert failed["status"] == "failed" and "2 times" in failed["error"]
        assert c.get(f"/v1/slides/{old}").status_code == 404 and not (jobs / old).exists()
        assert "histolite_slide_jobs_expired 1" in c.get("/metrics").text


def test_refusals_the_routes_cannot_see_are_audited(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histolite.serve.service import PredictionService

    with TestClient(
        create_app(
            ServeSettings(
                model_dir=repository, audit_db=tmp_path / "audit.db", max_request_bytes=2048
            )
        ),
        raise_server_exceptions=False,
    ) as c:
        too_big = c.post("/v1/predict", files={"files": ("a.png", b"x" * 5000)})
        assert too_big.status_code == 413
        unknown = c.post("/v1/models/nope/predict", files={"files": ("a.png", b"x")})
        assert unknown.status_code == 404
        assert c.get("/no/such/path").status_code == 404  # scanning: not audited
        monkeypatch.setattr(PredictionService, "classify", lambda *a: 1 / 0)
        png = _png(np.full((32, 32, 3), 128, np.uint8))
        assert c.post("/v1/predict", files={"files": ("a.png", png)}).status_code == 500
    rows = _audit_rows(tmp_path)
    outcomes = [outcome for outcome, _ in rows]
    assert "rejected 413" in outcomes and "rejected 404" in outcomes and "error 500" in outcomes
    assert not any("/no/such/path" in (detail or "") for _, detail in rows)


def test_requests_refused_before_routing_count_under_their_route(
    repository: Path, tmp_path: Path
) -> None:
    """A 413 from Content-Length was counted and audited as path "unmatched", so a dashboard
    never saw /v1/predict refusing uploads."""
    settings = ServeSettings(
        model_dir=repository, audit_db=tmp_path / "audit.db", max_request_bytes=2048
    )
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/predict", content=b"x" * 5000).status_code == 413
        assert c.get("/v1/predict").status_code == 405  # the route, with the wrong method
        assert c.get("/no/such/path").status_code == 404
        metrics = c.get("/metrics").text
    assert 'histolite_requests_total{method="POST",path="/v1/predict",status="413"} 1' in metrics
    assert 'path="/v1/predict",status="405"' in metrics
    assert 'path="unmatched",status="404"' in metrics and "/no/such/path" not in metrics
    assert ("rejected 413", "POST /v1/predict") in _audit_rows(tmp_path)


def test_a_request_s_images_share_one_pixel_budget(repository: Path, tmp_path: Path) -> None:
    """Each image was bounded alone: 16 of the largest in one request held a slot for minutes."""
    settings = ServeSettings(
        model_dir=repository, audit_db=tmp_path / "audit.db", max_request_pixels=2 * 64 * 64 + 10
    )
    rng = np.random.default_rng(0)
    tile = _png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    files = [("files", (f"t{i}.png", tile, "image/png")) for i in range(3)]
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/predict", files=files[:2]).status_code == 200
        refused = client.post("/v1/predict", files=files)
    assert refused.status_code == 413
    detail = refused.json()["detail"]
    assert detail.startswith("t2.png: the request's images together exceed 8,202 pixels")
    assert "HISTOLITE_MAX_REQUEST_PIXELS" in detail
    assert _audit_rows(tmp_path)[-1][0] == "rejected 413"


def test_serve_bounds_connections_per_worker(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Any
) -> None:
    import uvicorn

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.update(kw))
    for field in ServeSettings.model_fields:  # serve exports them all; undone after the test
        monkeypatch.delenv(f"HISTOLITE_{field.upper()}", raising=False)
    monkeypatch.setenv("HISTOLITE_MAX_CONNECTIONS", "12")
    code, _, err = run_cli(["serve", str(repository), "--audit-db", ""])
    assert code == 0, err
    assert seen["limit_concurrency"] == 12


def test_jobs_queued_together_cannot_fill_the_disk_past_the_quota(
    repository: Path, tmp_path: Path, synthetic_dir: Path
) -> None:
    """The quota was checked on submit only: 8 queued jobs could each write past it."""
    tiles = [[np.asarray(Image.open(p)) for p in sorted((synthetic_dir / "tumor").iterdir())[:3]]]
    mosaic_slide(tmp_path / "slides" / "s1.tif", tiles, mpp=0.5)
    with _slide_service(repository, tmp_path, slide_jobs_disk_quota_mb=1) as c:
        jobs = c.app.state.service.jobs  # type: ignore[attr-defined]
        gate = threading.Event()
        original = jobs._run
        jobs._run = lambda job_id: (gate.wait(30), original(job_id))
        job = c.post("/v1/slides", json={"slide": "s1.tif", "model": "tiles"}).json()["id"]
        (tmp_path / "jobs" / "ballast").write_bytes(b"\0" * (2 * 1024**2))  # filled meanwhile
        gate.set()
        state = _wait(c, job)
    assert state["status"] == "failed" and "MB quota" in state["error"]


def test_a_graceful_stop_queues_the_running_job_again_without_an_attempt(
    repository: Path, tmp_path: Path, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two deploys while a job ran once failed it as a poison job (stopped its worker twice)."""
    import histolite.serve.slide_jobs as slide_jobs

    tiles = [[np.asarray(Image.open(p)) for p in sorted((synthetic_dir / "tumor").iterdir())[:3]]]
    mosaic_slide(tmp_path / "slides" / "s1.tif", tiles, mpp=0.5)
    entered, release = threading.Event(), threading.Event()
    real = slide_jobs.classify_slide

    def held(*args: Any, check: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        check()  # its next check after the service began to stop
        return real(*args, check=check, **kwargs)

    monkeypatch.setattr(slide_jobs, "classify_slide", held)
    # held past the stop's wait: the stop gives up on it, and it re-queues when it gets there
    monkeypatch.setattr(slide_jobs, "CLOSE_WAIT_S", 0.2)
    with _slide_service(repository, tmp_path) as c:
        job = c.post("/v1/slides", json={"slide": "s1.tif", "model": "tiles"}).json()["id"]
        assert entered.wait(30)
    release.set()  # the service has stopped (lifespan shutdown)
    state_file = tmp_path / "jobs" / job / "job.json"
    for _ in range(100):
        saved = json.loads(state_file.read_text())
        if saved["status"] != "running":
            break
        time.sleep(0.1)
    assert saved["status"] == "queued" and saved["attempts"] == 0
    monkeypatch.setattr(slide_jobs, "classify_slide", real)
    with _slide_service(repository, tmp_path) as c:
        state = _wait(c, job)
    assert state["status"] == "done", state.get("error")
    assert json.loads(state_file.read_text())["attempts"] == 1
