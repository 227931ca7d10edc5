"""Append-only audit log of predictions (SQLite): who asked what, which model answered what.

Rows are never updated or deleted: triggers refuse both, so the log is evidence, not a cache.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from histolite.errors import HistoliteError
from histolite.fileio import atomic_path

COLUMNS = (
    "id",
    "time",
    "client",
    "input_sha256",
    "filename",
    "model_name",
    "model_version",
    "predicted_class",
    "probabilities",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    client TEXT,
    input_sha256 TEXT NOT NULL,
    filename TEXT,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    predicted_class TEXT NOT NULL,
    probabilities TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS predictions_no_update BEFORE UPDATE ON predictions
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS predictions_no_delete BEFORE DELETE ON predictions
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS slide_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    client TEXT,
    job_id TEXT NOT NULL,
    slide TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT
);
CREATE TRIGGER IF NOT EXISTS slide_jobs_no_update BEFORE UPDATE ON slide_jobs
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS slide_jobs_no_delete BEFORE DELETE ON slide_jobs
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"""


class AuditLog:
    """One connection shared by the server's threads, writes serialised by a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def record(
        self,
        *,
        client: str | None,
        input_sha256: str,
        filename: str | None,
        model_name: str,
        model_version: str,
        predicted_class: str,
        probabilities: dict[str, float],
    ) -> None:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            self._db.execute(
                "INSERT INTO predictions (time, client, input_sha256, filename, model_name, "
                "model_version, predicted_class, probabilities) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    now,
                    client,
                    input_sha256,
                    filename,
                    model_name,
                    model_version,
                    predicted_class,
                    json.dumps(probabilities, sort_keys=True),
                ),
            )

    def record_job(
        self,
        *,
        client: str | None,
        job_id: str,
        slide: str,
        model_name: str,
        model_version: str,
        event: str,
        detail: str | None = None,
    ) -> None:
        """A slide job's life: submitted, then done or failed (with what it found or why)."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            self._db.execute(
                "INSERT INTO slide_jobs (time, client, job_id, slide, model_name, model_version, "
                "event, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now, client, job_id, slide, model_name, model_version, event, detail),
            )

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def export_audit_csv(db_path: str | Path, out: str | Path) -> int:
    """Write every audit row to CSV (atomically); returns the number of rows."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise HistoliteError(f"{db_path}: audit database not found")
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows: list[Any] = db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM predictions ORDER BY id"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise HistoliteError(f"{db_path}: not a histolite audit database ({exc})") from exc
    finally:
        db.close()
    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return len(rows)
