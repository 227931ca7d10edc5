"""The service's audit log (SQLite): every request's outcome, tamper-evident.

Each row is chained to the one before it: ``row_hash = SHA-256(previous row_hash + the row's
content, id included)``, and the first row's ``previous`` is the hash of the model cards being
served. Triggers refuse UPDATE and DELETE through SQLite, but anyone with the file can drop them;
the chain is what makes that visible: changing, deleting, inserting or renumbering a row breaks
it at that row, and ``histolite audit verify DB`` reports the first broken row (exit status 1).
What it cannot show is the removal of the newest rows together with nothing after them (compare
the row count with the service's own counters, or ship rows elsewhere as they are written).

A request is audited all-or-nothing: an upload of three images that fails on the third writes one
``rejected`` row with the reason, not two predictions. When the log cannot be written (file
deleted or unwritable, database locked, disk full), ``AuditUnavailable`` is raised: the service
answers 503 and reports not ready, rather than predicting without a record.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolite.errors import HistoliteError
from histolite.fileio import atomic_path

FIELDS = (
    "time",
    "kind",
    "client",
    "request_id",
    "input_sha256",
    "filename",
    "model_name",
    "model_version",
    "outcome",
    "predicted_class",
    "probabilities",
    "detail",
)
COLUMNS = ("id", *FIELDS, "previous_hash", "row_hash")
LOCK_WAIT_S = 2.0  # a locked database fails a request in seconds, not after SQLite's default

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{name} TEXT" for name in FIELDS)},
    previous_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"""
_INJECTION_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class AuditUnavailable(HistoliteError):
    """The audit log cannot be written; requests that must be audited are refused (503)."""


def chain_hash(previous: str, row_id: int, values: dict[str, Any]) -> str:
    content = json.dumps([row_id, [values.get(f) for f in FIELDS]], separators=(",", ":"))
    return hashlib.sha256((previous + content).encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One audited event; ``probabilities`` is stored as JSON."""

    kind: str
    outcome: str
    client: str | None = None
    request_id: str | None = None
    input_sha256: str | None = None
    filename: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    predicted_class: str | None = None
    probabilities: dict[str, float] | None = None
    detail: str | None = None

    def values(self, time: str) -> dict[str, Any]:
        values = {f: getattr(self, f, None) for f in FIELDS if f != "time"}
        values["time"] = time
        if self.probabilities is not None:
            values["probabilities"] = json.dumps(self.probabilities, sort_keys=True)
        return values


class AuditLog:
    """One connection shared by the server's threads, writes serialised by a lock."""

    def __init__(self, path: str | Path, genesis: str = "") -> None:
        self.path = Path(path)
        self.genesis = genesis
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=LOCK_WAIT_S
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise AuditUnavailable(f"{self.path}: cannot open the audit log ({exc})") from exc
        self._inode = self._identity()
        self._lock = threading.Lock()
        self.failure: str | None = None

    def _identity(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    def healthy(self) -> bool:
        """The file this log writes is still there, the same file, and writable."""
        if self._identity() != self._inode or not os.access(self.path, os.W_OK):
            self.failure = f"{self.path.name} was deleted, replaced or made read-only"
            return False
        return self.failure is None or self._recover()

    def _recover(self) -> bool:
        """After a failed write, healthy again only once a real row is written: a lock that
        can be taken says nothing about a full disk, which fails only when pages are written.
        The row records the outage in the chain."""
        try:
            self.write(
                [
                    Entry(
                        kind="audit",
                        outcome="recovered",
                        detail=f"the log was unavailable: {self.failure}"[:500],
                    )
                ]
            )
        except AuditUnavailable:
            return False
        return True

    def write(self, entries: Iterable[Entry]) -> None:
        """Append entries in one transaction, chained; all or none."""
        if self._identity() != self._inode:
            self.failure = f"{self.path.name} was deleted or replaced while serving"
            raise AuditUnavailable(f"audit log unavailable: {self.failure}")
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                last = self._db.execute(
                    "SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1"
                ).fetchone()
                row_id, previous = (last[0], last[1]) if last else (0, self.genesis)
                for entry in entries:
                    values = entry.values(now)
                    row_id += 1
                    digest = chain_hash(previous, row_id, values)
                    self._db.execute(
                        f"INSERT INTO audit (id, {', '.join(FIELDS)}, previous_hash, row_hash) "
                        f"VALUES ({', '.join('?' * (len(FIELDS) + 3))})",
                        (row_id, *(values[f] for f in FIELDS), previous, digest),
                    )
                    previous = digest
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                self.failure = str(exc)
                raise AuditUnavailable(f"audit log unavailable: {exc}") from exc
        self.failure = None

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
        self.write(
            [
                Entry(
                    kind="slide_job",
                    outcome=event,
                    client=client,
                    request_id=job_id,
                    filename=slide,
                    model_name=model_name,
                    model_version=model_version,
                    detail=detail,
                )
            ]
        )

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _open_read_only(db_path: str | Path) -> sqlite3.Connection:
    db_path = Path(db_path)
    if not db_path.is_file():
        raise HistoliteError(f"{db_path}: audit database not found")
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)


def verify_audit(db_path: str | Path, genesis: str | None = None) -> tuple[int, str | None]:
    """(rows checked, None) when the chain holds, else (rows, why the first broken row is)."""
    db = _open_read_only(db_path)
    try:
        rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY id").fetchall()
    except sqlite3.DatabaseError as exc:
        raise HistoliteError(f"{db_path}: not a histolite audit database ({exc})") from exc
    finally:
        db.close()
    previous = None
    for expected_id, row in enumerate(rows, start=1):
        record = dict(zip(COLUMNS, row, strict=True))
        if record["id"] != expected_id:
            return expected_id - 1, f"row {expected_id}: missing (found id {record['id']} instead)"
        if previous is None:
            if genesis is not None and record["previous_hash"] != genesis:
                return 0, "row 1: does not start from the served models' card hash"
        elif record["previous_hash"] != previous:
            return expected_id - 1, f"row {expected_id}: not chained to row {expected_id - 1}"
        digest = chain_hash(record["previous_hash"], record["id"], record)
        if digest != record["row_hash"]:
            return expected_id - 1, f"row {expected_id}: content changed after it was written"
        previous = record["row_hash"]
    return len(rows), None


def _neutralise(value: Any) -> Any:
    """Spreadsheets run cells that start with = + - @: prefix those with a quote."""
    if isinstance(value, str) and value.startswith(_INJECTION_PREFIXES):
        return "'" + value
    return value


def export_audit_csv(db_path: str | Path, out: str | Path) -> int:
    """Write every audit row to CSV (atomically, formula-safe); returns the number of rows."""
    db = _open_read_only(db_path)
    try:
        rows: list[Any] = db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY id"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise HistoliteError(f"{db_path}: not a histolite audit database ({exc})") from exc
    finally:
        db.close()
    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows([_neutralise(v) for v in row] for row in rows)
    return len(rows)
