"""Load test of `histolite serve` on loopback: requests/s, latency percentiles, errors, memory.

Starts the real server (uvicorn, ONNX Runtime) as a subprocess on 127.0.0.1, sends a bounded
number of multipart uploads from concurrent async clients, stops on the request count or the
time limit, and prints what it measured. Traffic never leaves this machine.

    python benchmarks/load_serve.py --model MODEL_DIR [--requests 3000] [--concurrency 16]
        [--time-limit 60] [--workers 1] [--image TILE.png]
    # mixed traffic over a repository of several models: requests alternate between them
    python benchmarks/load_serve.py --model REPOSITORY --route-models tiles bags
    # the same load while 40 clients keep URL fetches open against a server sending 1 byte/s
    python benchmarks/load_serve.py --model MODEL_DIR --slow-fetches 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # loopback only, by design
KATHER = Path(__file__).resolve().parents[2] / "shared" / "data" / "kather2016"


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn workers), in MB."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (uvicorn workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            continue
    return total / ticks


def default_image() -> Path:
    tiles = sorted(KATHER.glob("04_LYMPHO/*.png"))
    if tiles:
        return tiles[0]
    from histolite.data.synthetic import generate_synthetic_dataset

    root = generate_synthetic_dataset(
        Path(tempfile.mkdtemp()) / "tiles",
        images_per_class=1,
        image_size=150,
        classes=("lympho",),
        progress=False,
    )
    return next((root / "lympho").iterdir())


class _Trickle(http.server.BaseHTTPRequestHandler):
    """An image server that sends one byte a second (a slow or hostile upstream)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(100000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(1.0)
        except OSError:
            return

    def log_message(self, *args: object) -> None:
        pass


async def hold_slow_fetches(base: str, slow_url: str, count: int, stop: asyncio.Event) -> dict:
    """``count`` clients that keep a slow URL fetch open until ``stop``; their statuses."""
    statuses: dict[int, int] = {}

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                response = await client.post(f"{base}/v1/predict", json={"url": slow_url})
                status = response.status_code
            except httpx.HTTPError:
                status = -1
            statuses[status] = statuses.get(status, 0) + 1
            if status == 429:
                await asyncio.sleep(0.5)

    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(client_loop(client)) for _ in range(count)]
        await stop.wait()
        for task in tasks:
            task.cancel()
    return statuses


async def run_load(
    urls: list[str], payload: bytes, name: str, total: int, concurrency: int, time_limit: float
) -> tuple[list[float], dict[int, int], float]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    issued = 0
    deadline = time.perf_counter() + time_limit

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < total and time.perf_counter() < deadline:
            url = urls[issued % len(urls)]  # mixed traffic: round-robin over the routes
            issued += 1
            started = time.perf_counter()
            try:
                response = await client.post(url, files={"files": (name, payload, "image/png")})
                status = response.status_code
            except httpx.HTTPError:
                status = -1
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="exported model folder")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds, at most")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads/worker")
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument(
        "--slow-fetches",
        type=int,
        default=0,
        help="keep this many URL fetches open against a 1 byte/s server during the load",
    )
    parser.add_argument(
        "--route-models",
        nargs="+",
        default=None,
        help="send to /v1/models/NAME/predict, alternating between these models",
    )
    args = parser.parse_args()
    image = args.image or default_image()
    payload = image.read_bytes()
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    audit = Path(tempfile.mkdtemp()) / "audit.sqlite"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "histolite",
            "serve",
            str(args.model),
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            str(args.workers),
            "--audit-db",
            str(audit),
            *(["--threads", str(args.threads)] if args.threads else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # the slow upstream runs on loopback, which the service refuses unless told (tests only)
        env={**os.environ, **({"HISTOLITE_ALLOW_PRIVATE_URLS": "1"} if args.slow_fetches else {})},
    )
    base = f"http://{HOST}:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        else:
            raise SystemExit("server did not become ready in 30 s")
        httpx.post(f"{base}/v1/predict", files={"files": (image.name, payload)})  # warm-up
        memory_before = rss_mb(server.pid)
        server_cpu_before = cpu_seconds(server.pid)
        client_cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        routes = (
            [f"{base}/v1/models/{m}/predict" for m in args.route_models]
            if args.route_models
            else [f"{base}/v1/predict"]
        )

        async def measured() -> tuple[list[float], dict[int, int], float, dict]:
            stop = asyncio.Event()
            holders = None
            if args.slow_fetches:
                trickle = http.server.ThreadingHTTPServer((HOST, 0), _Trickle)
                trickle.daemon_threads = True
                threading.Thread(target=trickle.serve_forever, daemon=True).start()
                slow_url = f"http://{HOST}:{trickle.server_address[1]}/slow.png"
                holders = asyncio.create_task(
                    hold_slow_fetches(base, slow_url, args.slow_fetches, stop)
                )
                await asyncio.sleep(2.0)  # let them connect and hold
            result = await run_load(
                routes, payload, image.name, args.requests, args.concurrency, args.time_limit
            )
            stop.set()
            slow_statuses = await holders if holders is not None else {}
            return (*result, slow_statuses)

        latencies, statuses, elapsed, slow_statuses = asyncio.run(measured())
        memory_after = rss_mb(server.pid)
        server_cpu = cpu_seconds(server.pid) - server_cpu_before
        usage = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = (
            usage.ru_utime
            - client_cpu_before.ru_utime
            + usage.ru_stime
            - client_cpu_before.ru_stime
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    done = len(latencies)
    errors = sum(n for status, n in statuses.items() if status != 200)
    ms = sorted(1000 * x for x in latencies)
    q = statistics.quantiles(ms, n=100) if len(ms) >= 2 else ms * 99
    print(
        f"model: {args.model} | image: {image.name} ({len(payload)} bytes) | "
        f"server workers: {args.workers} | ORT threads: {args.threads or 'default'} | "
        f"concurrency: {args.concurrency} | cpus: {os.cpu_count()} | routes: "
        f"{', '.join(args.route_models) if args.route_models else '/v1/predict'}"
    )
    print(f"requests: {done} in {elapsed:.1f} s -> {done / elapsed:.1f} requests/s")
    print(f"latency ms: p50 {q[49]:.1f}  p95 {q[94]:.1f}  p99 {q[98]:.1f}  max {ms[-1]:.1f}")
    print(f"errors: {errors} (status counts: {dict(sorted(statuses.items()))})")
    print(
        f"CPU per request: server {1000 * server_cpu / done:.2f} ms, load client "
        f"{1000 * client_cpu / done:.2f} ms (both on this machine's {os.cpu_count()} cores)"
    )
    print(f"server memory (RSS): before {memory_before:.0f} MB, after {memory_after:.0f} MB")
    if args.slow_fetches:
        print(
            f"{args.slow_fetches} clients held slow URL fetches during the load; their answers: "
            f"{dict(sorted(slow_statuses.items()))} (429: over the concurrent-fetch limit)"
        )


if __name__ == "__main__":
    main()
