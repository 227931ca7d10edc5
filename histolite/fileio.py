"""Atomic file writes: an output is either complete or absent, never half written."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` only on success.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(target: str | Path, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, data: Any) -> Path:
    """Write JSON atomically (indented, keys in insertion order, NaN refused)."""
    return write_text(target, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_json_once(target: str | Path, data: Any) -> Any:
    """Write JSON to ``target`` unless it exists; return what ``target`` holds afterwards.

    For a record several processes may create at once (shards started together): exactly one
    write wins, the others read the winner's complete file instead of replacing it, so each can
    compare it with its own.
    """
    target = Path(target)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.link(tmp_name, target)  # atomic create-if-absent of a complete file
    except FileExistsError:
        return read_json(target)
    finally:
        os.unlink(tmp_name)
    return data


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming it in the error if it is missing or malformed."""
    from histolite.errors import HistoliteError

    path = Path(path)
    if not path.is_file():
        raise HistoliteError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HistoliteError(f"{path}: not valid JSON ({exc})") from exc


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
