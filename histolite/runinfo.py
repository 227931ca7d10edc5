"""Run metadata written next to every output: what produced it, where, from which data."""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from histolite import __version__


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current git commit of ``cwd`` (or of the histolite source), if it is a checkout."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def fingerprint_files(entries: Iterable[tuple[str, str]]) -> str:
    """A stable fingerprint of a dataset: SHA-256 over sorted (relative path, label) pairs.

    File contents are not hashed (reading every byte of a large dataset twice is too slow):
    two runs with the same fingerprint saw the same files under the same labels and splits,
    not necessarily the same bytes.
    """
    digest = hashlib.sha256()
    for rel, label in sorted(entries):
        digest.update(f"{rel}\t{label}\n".encode())
    return digest.hexdigest()


def run_metadata(
    *, seed: int | None = None, dataset_fingerprint: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Everything needed to tell later which code, platform and data produced a run."""
    import torch

    meta: dict[str, Any] = {
        "histolite_version": __version__,
        "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "command": sys.argv,
        "seed": seed,
        "dataset_fingerprint": dataset_fingerprint,
    }
    meta.update(extra)
    return meta
