"""A hostile client against a live service on loopback: what each probe costs the server.

Starts ``histolite serve`` (a small classifier and a small attention-MIL bag model, trained on
the synthetic tiles unless ``--repository`` is given; a keyed audit log; slide jobs on) on
127.0.0.1, then runs each probe, bounded in count and time, while a second thread polls
``/healthz`` every 50 ms and a third samples the server's resident memory every 50 ms. Per
probe: the statuses it got, the slowest answer, the server's peak RSS and the /healthz p99
during it, and how many of its answered API requests are in the audit log.

    python benchmarks/abuse.py [--repository MODELS] [--out runs/abuse]

Goal (issue 25): every probe answered 4xx within 2 s (the slow-client probes by design at
their configured timeouts), /healthz p99 under 100 ms, server RSS under 1 GB, no 5xx, every
answered API request audited.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import tifffile
from PIL import Image

BODY_TIMEOUT_S, HEAD_TIMEOUT_S = 3.0, 3.0  # the service's slow-client limits for this run
TILES = "/v1/models/tiles/predict"  # the classifier (the default model is the bag model)


PINGER = """
import sys, time, httpx
with httpx.Client(timeout=30) as client:
    while True:
        started = time.perf_counter()
        try:
            client.get(sys.argv[1] + "/healthz")
            print(time.perf_counter() - started, flush=True)
        except httpx.HTTPError:
            print(30.0, flush=True)
        time.sleep(0.05)
"""


@dataclass
class Outcome:
    name: str
    expected: str
    statuses: list[int | str] = field(default_factory=list)
    slowest_s: float = 0.0
    peak_rss_mb: float = 0.0
    healthz_p99_ms: float = 0.0
    api_requests: int = 0
    audited: int = 0


class Watch:
    """Samples the server's RSS and /healthz latency in the background."""

    def __init__(self, pid: int, base: str) -> None:
        self.pid, self.base = pid, base
        self.rss: list[float] = []
        self.health: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._mem, self._ping)]

    def _mem(self) -> None:
        while not self._stop.is_set():
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.rss.append(int(line.split()[1]) / 1024)
            time.sleep(0.05)

    def _ping(self) -> None:
        """/healthz every 50 ms from a process of its own: the probes' threads in this one
        would otherwise delay the pings and be counted as the server's latency."""
        pinger = subprocess.Popen(
            [sys.executable, "-c", PINGER, self.base], stdout=subprocess.PIPE, text=True
        )
        assert pinger.stdout is not None
        while not self._stop.is_set():
            line = pinger.stdout.readline()
            if line:
                self.health.append(float(line))
        pinger.terminate()
        pinger.wait()

    def __enter__(self) -> Watch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def progressive_bomb() -> bytes:
    """A small progressive JPEG whose frame header declares 7000 x 8000 pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(
        buffer, format="JPEG", progressive=True, quality=90
    )
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc2")
    struct.pack_into(">HH", data, sof + 5, 7000, 8000)  # height, width
    return bytes(data)


def tiff_bytes(pixels: np.ndarray, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, compression="zlib", **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


def raw_request(port: int, head: bytes, timeout: float = 10.0) -> int | str:
    """A request over a plain socket (URLs that HTTP clients refuse to send); its status."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        reply = sock.recv(200)
    return _status(reply)


def _status(reply: bytes) -> int | str:
    return int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/") else "closed"


def slowloris(port: int) -> str:
    """Request-head bytes one every 0.25 s: the server must close the connection."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=HEAD_TIMEOUT_S + 5) as sock:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400:
            try:
                sock.send(bytes([byte]))
            except OSError:
                return f"closed after {time.perf_counter() - started:.1f} s"
            time.sleep(0.25)
            if time.perf_counter() - started > HEAD_TIMEOUT_S + 4:
                return "still open"
    return "closed"


def slow_body(port: int) -> int | str:
    """A body that stops half-way: the server must answer 408."""
    with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + 5) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"url": '
        )
        reply = sock.recv(200)
    return _status(reply)


def probes(port: int, base: str, tile: bytes) -> list[tuple[str, str, int, Callable[[], object]]]:
    """(name, expected, API requests it makes, run) of every probe."""
    client = httpx.Client(timeout=30)
    bomb = '{"pad": [' + ",".join(["{}"] * 8_000_000) + '], "url": 1}'

    def post(path: str, **kwargs: object) -> Callable[[], object]:
        def send() -> object:
            try:
                return client.post(f"{base}{path}", **kwargs).status_code  # type: ignore[arg-type]
            except httpx.HTTPError as exc:  # the server answered early and closed
                return f"closed ({type(exc).__name__})"

        return send

    def together(call: Callable[[], object], count: int) -> Callable[[], object]:
        def run() -> object:
            with ThreadPoolExecutor(count) as pool:
                return [f.result() for f in [pool.submit(call) for _ in range(count)]]

        return run

    def mixed(calls: list[Callable[[], object]]) -> Callable[[], object]:
        def run() -> object:
            with ThreadPoolExecutor(len(calls)) as pool:
                return [f.result() for f in [pool.submit(call) for call in calls]]

        return run

    json_headers = {"content-type": "application/json"}
    big = np.random.default_rng(0).integers(0, 255, (3000, 3000, 3), dtype=np.uint8)
    tiff16 = tiff_bytes(np.full((4000, 4000, 4), 40_000, np.uint16), photometric="rgb",
                        extrasamples=["unassalpha"])  # fmt: skip
    cmyk = tiff_bytes(np.full((64, 64, 4), 100, np.uint8), photometric="separated")
    lab = tiff_bytes(np.full((64, 64, 3), 100, np.uint8), photometric="cielab")
    return [
        ("json bomb x6, /v1/predict", "413", 6,
         together(post("/v1/predict", content=bomb, headers=json_headers), 6)),
        ("json bomb x6, /v1/slides", "413", 6,
         together(post("/v1/slides", content=bomb, headers=json_headers), 6)),
        ("slide name a/ x 300000", "413", 1,
         post("/v1/slides", json={"slide": "a/" * 300_000 + "x.tif", "model": "tiles"})),
        ("slide name of 256 + .tif", "422", 1,
         post("/v1/slides", json={"slide": "a" * 256 + ".tif", "model": "tiles"})),
        ("slide name of 20 MB", "413", 1,
         post("/v1/slides", json={"slide": "a" * 20_000_000, "model": "tiles"})),
        ("model name of 70 KB", "4xx", 1,
         lambda: raw_request(port, b"POST /v1/models/" + b"m" * 70_000 + b"/predict HTTP/1.1"
                             b"\r\nHost: x\r\nContent-Length: 0\r\n\r\n")),
        ("bag model, 3000 x 3000 PNG", "413", 1,
         post("/v1/models/bags/predict", files={"files": ("big.png", _png(big))})),
        ("progressive JPEG bomb x2 + a tile", "413, 413, 200", 3,
         mixed([post(TILES, files={"files": ("b.jpg", progressive_bomb())})] * 2
               + [post(TILES, files={"files": ("t.png", tile)})])),
        ("16-bit RGBA TIFF 4000 x 4000 x2", "200 or 413", 2,
         together(post(TILES, files={"files": ("a.tif", tiff16)}), 2)),
        ("CMYK TIFF", "415", 1, post(TILES, files={"files": ("c.tif", cmyk)})),
        ("CIELAB TIFF", "415", 1, post(TILES, files={"files": ("l.tif", lab)})),
        ("URL on 6to4 of 169.254.169.254", "403", 1,
         post("/v1/predict", json={"url": "http://[2002:a9fe:a9fe::1]/a.png"})),
        ("URL on site-local fec0::1", "403", 1,
         post("/v1/predict", json={"url": "http://[fec0::1]/a.png"})),
        ("unknown model", "404", 1,
         post("/v1/models/nope/predict", files={"files": ("t.png", tile)})),
        (f"body stalls ({BODY_TIMEOUT_S:g} s timeout)", "408", 1, lambda: slow_body(port)),
        (f"head a byte at a time ({HEAD_TIMEOUT_S:g} s timeout)", "closed", 0,
         lambda: slowloris(port)),
        ("a normal tile", "200", 1, post(TILES, files={"files": ("t.png", tile)})),
    ]  # fmt: skip


def audit_rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])


def flatten(result: object) -> list[int | str]:
    if isinstance(result, list):
        return [v for item in result for v in flatten(item)]
    return [result]  # type: ignore[list-item]


def build_repository(root: Path) -> Path:
    """A classifier and a bag model trained briefly on the built-in synthetic tiles."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import export_small_model, write_config

    from histolite.data.synthetic import generate_synthetic_dataset
    from histolite.export.onnx import export_run
    from histolite.train import resolve_config
    from histolite.train.mil import mil_run

    data = generate_synthetic_dataset(root / "data", images_per_class=16, image_size=32,
                                      slides=4, seed=1, progress=False)  # fmt: skip
    models = root / "models"
    tiles = export_small_model(root / "tiles_work", data)
    (models / "tiles").mkdir(parents=True)
    tiles.rename(models / "tiles" / "1")
    bags = root / "bags_data"
    from histolite.data.folder import scan_image_folder
    from histolite.data.mosaic import MosaicSpec, build_mosaic_bags

    build_mosaic_bags(scan_image_folder(data), bags, MosaicSpec("tumor", grid=3, bags_per_class=8,
                      tile_size=32), seed=0)  # fmt: skip
    config = write_config(root / "mil.yaml", bags,
                          data={"image_size": 32, "batch_size": 8, "val_fraction": 0.2},
                          mil={"patch": {"size": 32}, "freeze_backbone": False,
                               "cache_features": False})  # fmt: skip
    cfg = resolve_config(config, ["trainer.max_epochs=1"], root / "mil", resume=False)
    export_run(mil_run(cfg, root / "mil", progress=False), models / "bags" / "1",
               progress=False, parity_samples=4)  # fmt: skip
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/abuse"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="abuse-"))
    repository = args.repository or build_repository(work)
    key = work / "audit.key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o400)
    (work / "slides").mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "HISTOLITE_BODY_READ_TIMEOUT": str(BODY_TIMEOUT_S),
        "HISTOLITE_HEAD_TIMEOUT": str(HEAD_TIMEOUT_S),
        "HISTOLITE_MAX_PIXELS": "40000000",  # the Kubernetes ConfigMap's
    }
    db = work / "audit.sqlite"
    command = [str(Path(sys.executable).with_name("histolite")), "serve", str(repository),
               "--port", str(port), "--audit-db", str(db), "--audit-key-file", str(key),
               "--slide-root", str(work / "slides")]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        tile = _png(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
        outcomes = []
        for name, expected, requests, run in probes(port, base, tile):
            before = audit_rows(db)
            with Watch(server.pid, base) as watch:
                started = time.perf_counter()
                statuses = flatten(run())
                slowest = time.perf_counter() - started
                time.sleep(0.2)
            answered = sum(isinstance(s, int) and s != 401 for s in statuses)
            outcomes.append(
                Outcome(
                    name,
                    expected,
                    statuses,
                    slowest,
                    max(watch.rss, default=0.0),
                    1000 * float(np.percentile(watch.health, 99)) if watch.health else 0.0,
                    min(requests, answered),
                    audit_rows(db) - before,
                )
            )
            print(f"{name}: {statuses} in {slowest:.2f} s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    table = [
        "| probe | expected | statuses | slowest s | server peak RSS MB | /healthz p99 ms | "
        "audited / API answers |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        shown = ", ".join(str(s) for s in o.statuses)
        table.append(
            f"| {o.name} | {o.expected} | {shown} | {o.slowest_s:.2f} | {o.peak_rss_mb:.0f} | "
            f"{o.healthz_p99_ms:.1f} | {o.audited} / {o.api_requests} |"
        )
    all_health = [o.healthz_p99_ms for o in outcomes]
    fives = sum(isinstance(s, int) and s >= 500 for o in outcomes for s in o.statuses)
    peak = max(o.peak_rss_mb for o in outcomes)
    table += [
        "",
        f"Worst /healthz p99 over the probes: {max(all_health):.1f} ms (median probe "
        f"{statistics.median(all_health):.1f} ms); server peak RSS {peak:.0f} MB; "
        f"5xx answers: {fives}.",
    ]
    text = "\n".join(table) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abuse.md").write_text(text)
    (args.out / "abuse.json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=2))
    print(text)


if __name__ == "__main__":
    main()
