"""The service through the ASGI test client: every endpoint and every class of bad input."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from histolite.serve.app import ServeSettings, create_app
from histolite.serve.audit import export_audit_csv
from histolite.serve.fetch import UrlFetcher, UrlFetchError, is_public_address


@pytest.fixture(scope="session")
def model_dir(exported_model: Path) -> Path:
    return exported_model


def _client(model_dir: Path, tmp_path: Path, **settings: object) -> TestClient:
    app = create_app(
        ServeSettings(model_dir=model_dir, audit_db=tmp_path / "audit.sqlite", **settings)
    )  # type: ignore[arg-type]
    return TestClient(app)


@pytest.fixture
def client(model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    with _client(model_dir, tmp_path) as c:
        yield c


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _tile(synthetic_dir: Path, cls: str = "lympho", index: int = 0) -> bytes:
    return sorted((synthetic_dir / cls).iterdir())[index].read_bytes()


def test_health_model_docs_and_page(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    card = client.get("/v1/model").json()
    assert card["classes"] == ["adipose", "lympho", "stroma", "tumor"]
    # Swagger UI pulls its script from a CDN: off unless asked for (--docs)
    assert client.get("/docs").status_code == 404
    assert client.get("/openapi.json").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and "drop-zone" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    static = "".join(
        p.read_text()
        for p in (Path(__file__).parents[2] / "histolite" / "serve" / "static").iterdir()
    )
    assert "http://" not in static and "https://cdn" not in static  # no external assets


def test_predict_one_and_several_uploads(client: TestClient, synthetic_dir: Path) -> None:
    response = client.post("/v1/predict", files={"files": ("a.png", _tile(synthetic_dir))})
    assert response.status_code == 200, response.text
    body = response.json()
    [prediction] = body["predictions"]
    assert prediction["class"] in body["predictions"][0]["probabilities"]
    assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-4
    assert prediction["model_version"] == "1" and prediction["time_ms"] > 0
    assert prediction["patches"]["rows"] == prediction["patches"]["cols"] == 1
    files = [("files", (f"{i}.png", _tile(synthetic_dir, "tumor", i))) for i in range(3)]
    assert len(client.post("/v1/predict", files=files).json()["predictions"]) == 3


def test_large_image_returns_the_patch_grid(client: TestClient, synthetic_dir: Path) -> None:
    tiles = [np.array(Image.open(io.BytesIO(_tile(synthetic_dir, "stroma", i)))) for i in range(4)]
    big = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    prediction = client.post("/v1/predict", files={"files": ("big.png", _png(big))}).json()[
        "predictions"
    ][0]
    grid = prediction["patches"]
    assert (grid["rows"], grid["cols"], grid["size"]) == (2, 2, 32)
    assert np.array(grid["probabilities"]).shape == (2, 2, 4)
    # Grad-CAM of the answered class: one grid over the 64 x 64 image, in its pixels
    cam = prediction["explanation"]
    assert cam["method"] == "gradcam" and cam["class"] == prediction["class"]
    assert (cam["rows"], cam["cols"]) == (16, 16)
    assert cam["rows"] * cam["cell_height"] == 64 and cam["cols"] * cam["cell_width"] == 64
    values = np.array(cam["values"])
    assert values.shape == (16, 16) and values.min() == 0.0 and values.max() == 1.0


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (b"definitely not an image", 415, "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 422, "unreadable"),
    ],
)
def test_bad_uploads(client: TestClient, payload: bytes, status: int, message: str) -> None:
    response = client.post("/v1/predict", files={"files": ("x.png", payload)})
    assert response.status_code == status and message in response.json()["detail"]


def test_truncated_grayscale_and_empty(client: TestClient, synthetic_dir: Path) -> None:
    truncated = _tile(synthetic_dir)[:200]
    assert client.post("/v1/predict", files={"files": ("t.png", truncated)}).status_code == 422
    gray = _png(np.full((32, 32), 100, np.uint8))
    response = client.post("/v1/predict", files={"files": ("g.png", gray)})
    assert response.status_code == 422 and "grayscale" in response.json()["detail"]
    response = client.post("/v1/predict", files={"files": ("e.png", b"")})
    assert response.status_code == 422 and "empty" in response.json()["detail"]


def test_size_limits(model_dir: Path, tmp_path: Path, synthetic_dir: Path) -> None:
    with _client(model_dir, tmp_path, max_request_bytes=2000, max_pixels=64 * 64) as c:
        big_body = c.post("/v1/predict", files={"files": ("big.bin", b"x" * 5000)})
        assert big_body.status_code == 413
        bomb = _png(np.zeros((200, 200, 3), np.uint8))  # tiny file, too many pixels
        response = c.post("/v1/predict", files={"files": ("bomb.png", bomb)})
        assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]


def test_wrong_requests(client: TestClient) -> None:
    assert (
        client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}).status_code
        == 415
    )
    assert (
        client.post(
            "/v1/predict", content=b"{oops", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert client.post("/v1/predict", json={"link": "x"}).status_code == 422
    assert client.post("/v1/predict", json={"url": "ftp://example.org/a.png"}).status_code == 400
    assert client.post("/v1/predict", json={"url": "file:///etc/passwd"}).status_code == 400
    assert client.post("/v1/predict", data={"note": "form"}).status_code == 415  # urlencoded
    no_file = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--b--\r\n'
    response = client.post(
        "/v1/predict", content=no_file, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 422 and "no files" in response.json()["detail"]
    assert client.get("/v1/predict").status_code == 405


def test_url_to_private_addresses_is_refused(client: TestClient) -> None:
    for url in (
        "http://127.0.0.1:9/x.png",
        "http://localhost/x.png",
        "http://10.1.2.3/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://192.168.0.1/a.png",
    ):
        response = client.post("/v1/predict", json={"url": url})
        assert response.status_code == 403, (url, response.text)
        assert "non-public address" in response.json()["detail"]


def test_address_policy() -> None:
    assert is_public_address("93.184.216.34") and is_public_address("2606:4700::1")
    for address in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:10.0.0.1",
        "224.0.0.1",
        "100.64.0.1",
    ):
        assert not is_public_address(address), address


class _Handler(BaseHTTPRequestHandler):
    image = b""

    def do_GET(self) -> None:
        if self.path.startswith("/redirect-private"):
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.7/secret.png")
            self.end_headers()
        elif self.path.startswith("/loop/"):  # /loop/N redirects to /loop/N+1, forever
            self.send_response(302)
            self.send_header("Location", f"/loop/{int(self.path.rsplit('/', 1)[1]) + 1}")
            self.end_headers()
        elif self.path.startswith("/redirect-local"):
            self.send_response(302)
            self.send_header("Location", "/tile.png")
            self.end_headers()
        elif self.path.startswith("/tile.png"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_server(synthetic_dir: Path) -> Iterator[str]:
    _Handler.image = _tile(synthetic_dir)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_fetch_checks_every_redirect_hop(
    image_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import histolite.serve.fetch as fetch

    # trust this test's loopback server, and nothing else that is not public
    original = fetch.is_public_address
    monkeypatch.setattr(fetch, "is_public_address", lambda a: a == "127.0.0.1" or original(a))
    fetcher = UrlFetcher(timeout=5)
    assert asyncio.run(fetcher.fetch(f"{image_server}/redirect-local")).startswith(b"\x89PNG")
    with pytest.raises(UrlFetchError, match=r"10\.0\.0\.7") as info:
        asyncio.run(fetcher.fetch(f"{image_server}/redirect-private"))  # refused before connecting
    assert info.value.status == 403


@pytest.mark.parametrize("limit", [0, 2, 5])
def test_url_fetch_stops_at_the_redirect_limit(image_server: str, limit: int) -> None:
    fetcher = UrlFetcher(timeout=5, max_redirects=limit, allow_private=True)
    with pytest.raises(UrlFetchError, match=f"more than {limit} redirects") as info:
        asyncio.run(fetcher.fetch(f"{image_server}/loop/0"))
    assert info.value.status == 422
    # one hop fewer than the limit is followed to the image
    if limit:
        assert asyncio.run(fetcher.fetch(f"{image_server}/redirect-local")).startswith(b"\x89PNG")


def test_every_client_error_the_api_gives(
    model_dir: Path, tmp_path: Path, synthetic_dir: Path, image_server: str
) -> None:
    """Each 4xx of /v1/predict (and the routes around it), with the message that explains it."""
    tile = _tile(synthetic_dir)
    gray = _png(np.full((32, 32), 128, np.uint8))
    big = _png(np.zeros((400, 400, 3), np.uint8))
    cases: list[tuple[str, dict[str, object], int, str]] = [
        ("no key", {"files": {"files": ("a.png", tile)}}, 401, "API key"),
        ("file scheme", {"json": {"url": "file:///etc/passwd"}}, 400, "only http and https"),
        ("private host", {"json": {"url": "http://10.1.2.3/a.png"}}, 403, "non-public"),
        (
            "upstream 404",
            {"json": {"url": f"{image_server}/missing"}},
            422,
            "did not return an image",
        ),
        ("redirect loop", {"json": {"url": f"{image_server}/loop/0"}}, 422, "redirects"),
        ("no url", {"json": {"link": "x"}}, 422, "JSON body must be"),
        (
            "bad json",
            {"content": b"{", "headers": {"content-type": "application/json"}},
            422,
            "not valid JSON",
        ),
        ("no files", {"data": {"note": "x"}, "files": {"other": ("", b"")}}, 422, "no files"),
        ("empty file", {"files": {"files": ("e.png", b"")}}, 422, "empty"),
        ("grayscale", {"files": {"files": ("g.png", gray)}}, 422, "grayscale"),
        ("not an image", {"files": {"files": ("x.png", b"hello")}}, 415, "not a recognised"),
        ("too many pixels", {"files": {"files": ("b.png", big)}}, 413, "exceeds the limit"),
        ("form encoding", {"data": {"note": "form"}}, 415, "multipart/form-data"),
        (
            "too many files",
            {"files": [("files", (f"{i}.png", tile)) for i in range(17)]},
            400,
            "malformed multipart upload",
        ),
    ]
    headers = {"X-API-Key": "k"}
    with _client(
        model_dir, tmp_path, api_key="k", max_pixels=100_000, allow_private_urls=False
    ) as c:
        for name, kwargs, status, words in cases:
            sent = dict(kwargs)
            if name != "no key":
                sent["headers"] = {**headers, **sent.get("headers", {})}  # type: ignore[dict-item]
            if name in ("upstream 404", "redirect loop"):
                continue  # needs a client that may reach loopback; checked below
            response = c.post("/v1/predict", **sent)  # type: ignore[arg-type]
            assert response.status_code == status, (name, response.text)
            assert words in response.json()["detail"], (name, response.text)
        assert c.get("/v1/predict", headers=headers).status_code == 405
        assert c.get("/no/such/route", headers=headers).status_code == 404
        assert c.get("/no/such/route").status_code == 401  # without the key, no route is shown
    with _client(model_dir, tmp_path, allow_private_urls=True, max_request_bytes=4096) as c:
        for name, kwargs, status, words in cases:
            if name in ("upstream 404", "redirect loop"):
                response = c.post("/v1/predict", **kwargs)  # type: ignore[arg-type]
                assert response.status_code == status, (name, response.text)
                assert words in response.json()["detail"], (name, response.text)
        body = c.post("/v1/predict", files={"files": ("big.bin", b"0" * 10_000)})
        assert body.status_code == 413 and "exceeds 4096 bytes" in body.json()["detail"]


def test_url_prediction_and_byte_cap(model_dir: Path, tmp_path: Path, image_server: str) -> None:
    with _client(model_dir, tmp_path, allow_private_urls=True) as c:
        response = c.post("/v1/predict", json={"url": f"{image_server}/tile.png"})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["filename"] == "tile.png"
        assert c.post("/v1/predict", json={"url": f"{image_server}/missing"}).status_code == 422
    with pytest.raises(UrlFetchError, match="limit") as info:
        asyncio.run(UrlFetcher(max_bytes=100, allow_private=True).fetch(f"{image_server}/tile.png"))
    assert info.value.status == 413


def test_api_key(model_dir: Path, tmp_path: Path, synthetic_dir: Path) -> None:
    with _client(model_dir, tmp_path, api_key="s3cret") as c:
        files = {"files": ("a.png", _tile(synthetic_dir))}
        assert c.post("/v1/predict", files=files).status_code == 401
        assert c.post("/v1/predict", files=files, headers={"X-API-Key": "wrong"}).status_code == 401
        assert (
            c.post("/v1/predict", files=files, headers={"X-API-Key": "s3cret"}).status_code == 200
        )
        assert (
            c.post(
                "/v1/predict", files=files, headers={"Authorization": "Bearer s3cret"}
            ).status_code
            == 200
        )
        # by default the key guards everything but health, readiness and the page itself
        for path in ("/v1/model", "/v1/models", "/metrics"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200, path
        for path in ("/healthz", "/readyz", "/", "/static/app.js"):
            assert c.get(path).status_code == 200, path
    # a documented choice: metadata and the API docs open, predictions still guarded
    with _client(model_dir, tmp_path, api_key="s3cret", open_metadata=True, docs=True) as c:
        for path in ("/v1/models", "/metrics", "/docs", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        assert "/v1/predict" in c.get("/openapi.json").json()["paths"]
        assert c.post("/v1/predict", files=files).status_code == 401


def test_one_key_check_guards_every_prediction_and_slide_route(
    model_dir: Path, tmp_path: Path
) -> None:
    """The key is checked once, before routing (RequireKey); the routes' own copy of the check
    (PredictionService.check_key) is gone. Even with metadata open, nothing that predicts or
    touches slides answers without the key, and with it the routes are reached."""
    import histolite.serve.service as service

    assert not hasattr(service.PredictionService, "check_key")
    (tmp_path / "slides").mkdir()
    settings = {"api_key": "s3cret", "open_metadata": True, "slide_root": tmp_path / "slides"}
    job = "0" * 32
    calls = [
        ("post", "/v1/predict"),
        ("post", "/v1/models/model/predict"),
        ("post", "/v1/models/model/versions/1/predict"),
        ("post", "/v1/slides"),
        ("get", f"/v1/slides/{job}"),
        ("get", f"/v1/slides/{job}/files/summary.json"),
    ]
    with _client(model_dir, tmp_path, **settings) as c:
        for method, path in calls:
            refused = getattr(c, method)(path, headers={"Authorization": "Bearer wrong"})
            assert refused.status_code == 401, (path, refused.status_code)
            reached = getattr(c, method)(path, headers={"X-API-Key": "s3cret"})
            assert reached.status_code not in (401, 500), (path, reached.status_code)


def test_concurrent_requests_share_one_session(client: TestClient, synthetic_dir: Path) -> None:
    def one(i: int) -> int:
        files = {"files": (f"{i}.png", _tile(synthetic_dir, "adipose", i % 8))}
        return client.post("/v1/predict", files=files).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(24))) == [200] * 24


def test_metrics_and_audit_log(model_dir: Path, tmp_path: Path, synthetic_dir: Path) -> None:
    with _client(model_dir, tmp_path) as c:
        data = _tile(synthetic_dir)
        for _ in range(3):
            c.post("/v1/predict", files={"files": ("a.png", data)})
        c.post("/v1/predict", files={"files": ("bad.png", b"nope")})
        text = c.get("/metrics").text
        assert 'histolite_requests_total{method="POST",path="/v1/predict",status="200"} 3' in text
        assert 'histolite_request_errors_total{path="/v1/predict",status="415"} 1' in text
        assert 'histolite_request_duration_seconds_count{path="/v1/predict"} 4' in text
    db = tmp_path / "audit.sqlite"
    rows = export_audit_csv(db, tmp_path / "audit.csv")
    assert rows == 4  # three predictions and the rejected upload, with its outcome
    with (tmp_path / "audit.csv").open() as fh:
        records = list(csv.DictReader(fh))
    import hashlib

    assert [r["outcome"] for r in records] == ["ok", "ok", "ok", "rejected 415"]
    assert records[0]["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert "not a recognised image" in records[3]["detail"]
    connection = sqlite3.connect(db)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        connection.execute("DELETE FROM audit")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        connection.execute("UPDATE audit SET predicted_class = 'x'")
    connection.close()


def test_never_a_500_for_junk(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    for i in range(20):
        junk = rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes()
        if i % 2:
            junk = b"\x89PNG\r\n\x1a\n" + junk
        assert client.post("/v1/predict", files={"files": ("j.png", junk)}).status_code < 500
        assert (
            client.post(
                "/v1/predict", content=junk, headers={"content-type": "application/json"}
            ).status_code
            < 500
        )


def test_serving_does_not_import_torch(model_dir: Path, tmp_path: Path) -> None:
    code = (
        "import sys, json; from histolite.serve.app import ServeSettings, create_app;"
        f"create_app(ServeSettings(model_dir={str(model_dir)!r}, audit_db=None));"
        "print(json.dumps('torch' in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) is False
