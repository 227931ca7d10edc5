"""A minimal, thread-safe Prometheus text exporter: counters and one latency histogram.

Small enough not to need prometheus_client; the names follow Prometheus conventions.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable

# (name, help, labels, value): a gauge read when /metrics is rendered
Gauge = tuple[str, str, tuple[tuple[str, str], ...], float]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Label values a client controls are bounded: any other method is "OTHER", any path without a
# route is "unmatched" (see middleware), so /metrics cannot be grown by random requests.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in pairs
    )
    return "{" + inner + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.errors: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.images: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.latency_counts: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self._gauges: list[Callable[[], list[Gauge]]] = []

    def add_gauges(self, source: Callable[[], list[Gauge]]) -> None:
        """A function whose gauges every rendering reads (slide job counts, disk use)."""
        self._gauges.append(source)

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else "OTHER"
        status = status if 100 <= status <= 599 else 0
        with self._lock:
            self.requests[(("method", method), ("path", path), ("status", str(status)))] += 1
            if status >= 400:
                self.errors[(("path", path), ("status", str(status)))] += 1
            counts = self.latency_counts.setdefault(path, [0] * (len(LATENCY_BUCKETS) + 1))
            counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum[path] += seconds

    def observe_prediction(self, predicted_class: str) -> None:
        with self._lock:
            self.images[(("class", predicted_class),)] += 1

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            lines += [
                "# HELP histolite_requests_total HTTP requests by method, path and status.",
                "# TYPE histolite_requests_total counter",
            ]
            lines += [
                f"histolite_requests_total{_labels(k)} {v}"
                for k, v in sorted(self.requests.items())
            ]
            lines += [
                "# HELP histolite_request_errors_total HTTP responses with status >= 400.",
                "# TYPE histolite_request_errors_total counter",
            ]
            lines += [
                f"histolite_request_errors_total{_labels(k)} {v}"
                for k, v in sorted(self.errors.items())
            ]
            lines += [
                "# HELP histolite_images_predicted_total Images classified, by predicted class.",
                "# TYPE histolite_images_predicted_total counter",
            ]
            lines += [
                f"histolite_images_predicted_total{_labels(k)} {v}"
                for k, v in sorted(self.images.items())
            ]
            lines += [
                "# HELP histolite_request_duration_seconds Request latency.",
                "# TYPE histolite_request_duration_seconds histogram",
            ]
            for path, counts in sorted(self.latency_counts.items()):
                cumulative = 0
                for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    lines.append(
                        f'histolite_request_duration_seconds_bucket{{path="{path}",le="{le}"}} '
                        f"{cumulative}"
                    )
                lines.append(
                    f'histolite_request_duration_seconds_sum{{path="{path}"}} '
                    f"{self.latency_sum[path]:.6f}"
                )
                lines.append(
                    f'histolite_request_duration_seconds_count{{path="{path}"}} {cumulative}'
                )
        described: set[str] = set()
        for source in self._gauges:
            for name, text, labels, value in source():
                if name not in described:
                    described.add(name)
                    lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
                lines.append(f"{name}{_labels(labels)} {value:g}")
        return "\n".join(lines) + "\n"
