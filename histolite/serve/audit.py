"""The service's audit log (SQLite): every request's outcome, chained so that changes show.

Each row is chained to the one before it: ``row_hash = H(previous row_hash + the row's content,
id included)``, and the first row's ``previous`` is the hash of the model cards being served.
Triggers refuse UPDATE and DELETE through SQLite, but anyone with the file can drop them; the
chain is what makes a change visible, and ``histolite audit verify DB`` reports the first broken
row (exit status 1). ``H`` is one of two schemes, recorded in the database's ``meta`` table
(``scheme``, and for a keyed log ``key_id``) when the log is created and never changed:

``sha256`` (unkeyed)
    ``H`` is plain SHA-256, so anyone can recompute it.
``hmac-sha256`` (keyed)
    ``H`` is HMAC-SHA256 with a secret key read from a file (``HISTOLITE_AUDIT_KEY_FILE``, e.g.
    a Kubernetes secret mounted as a file; see :func:`load_audit_key`). The key is never
    written to the database: ``meta`` holds only ``key_id``, a 16-hex-digit SHA-256 fingerprint
    that tells a wrong key from the right one.

A log keeps the scheme it was created with. A keyed log opened without its key, an unkeyed one
opened with a key, or a keyed one opened with another key is refused (:class:`AuditKeyError`),
never silently re-keyed: a writer that quietly changed scheme would hide exactly the rebuild the
key exists to expose. To move an unkeyed log to a key, archive it: ``histolite audit verify``
it, keep the line ``histolite audit head`` prints somewhere else, move the file aside
(read-only) and start the keyed service on a new file. The archive stays checkable with
``histolite audit verify OLD --expect-head LINE``.

``histolite audit head DB [--key-file F]`` prints the head, ``HASH@ROW`` (with a key also
``hmac-sha256:KEY_ID:SIGNATURE``, an HMAC of the row, hash and key id); keep that line
elsewhere (a SIEM, a ticket, WORM storage). ``histolite audit verify DB --expect-head LINE``
later confirms that the chain still holds that hash at that row.

What each mechanism defends against (``docs/threat-model.md``):

- **Unkeyed chain**: accidental corruption and naive edits only (a changed, deleted, inserted or
  renumbered row through SQL, without recomputing hashes). Anyone who can write the file can
  append a row computed with :func:`chain_hash`, edit a row and rehash the rows after it, or
  rebuild the whole chain, and it still verifies.
- **Keyed chain**: any edit, insertion, deletion inside the chain, appended row or rebuild by
  someone who can write the database but cannot read the key, including a "downgrade" to an
  unkeyed chain (verifying with the key refuses a log that says it is unkeyed).
- **Expected head exported elsewhere**: truncation or rollback to fewer rows, and a rebuilt or
  replaced chain, even by someone holding the key, for every row up to the exported one. It
  needs no key to check: without the key it checks the rows' order and links and the exported
  hash (not the rows' content, which a keyed log's hashes cover only for key holders); on an
  unkeyed log the exported hash covers the content of every row up to it. The signature of a
  keyed head shows a key holder that the line was exported with the key, not planted.
- **Out of scope**: someone holding the key and the database can rewrite everything after the
  last exported head (export heads often, e.g. from a cron job); the newest rows can be removed
  without trace between exports; deleting the whole database shows only as the service not
  being ready (and in its absence); times are written by the service's clock and are not
  attested; reading the rows (they are not encrypted); and an attacker who can read the key
  file, e.g. by running as the service's user, is a key holder.

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
import hmac
import json
import os
import re
import sqlite3
import stat
import threading
from collections.abc import Iterable, Mapping
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

SCHEME_SHA256 = "sha256"
SCHEME_HMAC = "hmac-sha256"
MIN_KEY_BYTES = 32  # 256 bits if random; shorter keys invite guessing from the key id
KEY_ID_CHARS = 16
_KEY_ID_PREFIX = b"histolite audit key id\x00"
_HEAD_PREFIX = "histolite-audit-head:v1"

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
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS meta_no_update BEFORE UPDATE ON meta
BEGIN SELECT RAISE(ABORT, 'the audit log''s scheme is fixed when it is created'); END;
CREATE TRIGGER IF NOT EXISTS meta_no_delete BEFORE DELETE ON meta
BEGIN SELECT RAISE(ABORT, 'the audit log''s scheme is fixed when it is created'); END;
"""
_INJECTION_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_HEAD_RE = re.compile(
    r"(?P<hash>[0-9a-f]{64})(?:@(?P<row>[0-9]+))?"
    rf"(?:\s+{re.escape(SCHEME_HMAC)}:(?P<key_id>[0-9a-f]{{{KEY_ID_CHARS}}}):(?P<sig>[0-9a-f]{{64}}))?"
)


class AuditUnavailable(HistoliteError):
    """The audit log cannot be written; requests that must be audited are refused (503)."""


class AuditMetaError(HistoliteError):
    """The ``meta`` table holds something this code never writes: the file was tampered with."""


class AuditKeyError(HistoliteError):
    """The audit key file is unusable, or is not the key (or lack of one) the log was made with.

    Raised when the service opens its log, so a misconfigured key stops the service at start
    instead of writing rows that would not verify.
    """


# ---------------------------------------------------------------------------------- the key
def load_audit_key(path: str | Path) -> bytes:
    """Read the audit key from ``path``; refuse files that would make the key weak or public.

    The rules, and why:

    - It must be a regular file (a Kubernetes secret volume's symlink to one is fine).
    - On POSIX it must not be readable or writable by every user (mode ``o+r`` or ``o+w``): a
      key any local user can read protects nothing, one anyone can write can be swapped. Owner
      and group may read it (``chmod 0400`` or ``0440``); Kubernetes mounts secrets ``0644`` by
      default, so set ``defaultMode: 0440`` (with ``fsGroup``) or ``0400`` on the volume.
    - Whitespace around the key is ignored, so the newline that ``echo`` or an editor adds does
      not change it; what remains is the key, used as bytes (a hex or base64 text is fine).
    - At least 32 bytes must remain: ``python -c "import secrets; print(secrets.token_hex(32))"``
      makes a good one (64 hex digits, 256 random bits).

    Raises:
        AuditKeyError: naming the file and what to do, for each rule broken.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AuditKeyError(f"{path}: audit key file not found") from None
    except OSError as exc:
        raise AuditKeyError(f"{path}: cannot read the audit key file ({exc.strerror})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise AuditKeyError(f"{path}: the audit key file is not a regular file")
    if os.name == "posix" and info.st_mode & 0o006:
        raise AuditKeyError(
            f"{path}: the audit key file can be read or written by every user (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); let only its owner and group read it (chmod "
            "0400 or 0440; on Kubernetes, defaultMode: 0440 on the secret volume)"
        )
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise AuditKeyError(f"{path}: cannot read the audit key file ({exc.strerror})") from exc
    if len(key) < MIN_KEY_BYTES:
        raise AuditKeyError(
            f"{path}: the audit key file holds {len(key)} bytes of key (whitespace around it is "
            f"ignored); at least {MIN_KEY_BYTES} are needed, e.g. "
            f'python -c "import secrets; print(secrets.token_hex(32))" > {path}'
        )
    return key


def key_fingerprint(key: bytes) -> str:
    """The key id stored in the log: tells keys apart without revealing them (16 hex digits)."""
    return hashlib.sha256(_KEY_ID_PREFIX + key).hexdigest()[:KEY_ID_CHARS]


def chain_hash(
    previous: str, row_id: int, values: Mapping[str, Any], key: bytes | None = None
) -> str:
    """A row's hash: over the previous row's hash, its id and its fields, keyed when ``key`` is.

    Without a key anyone can compute it, which is why an unkeyed chain only shows changes made
    by someone who did not recompute it.
    """
    content = json.dumps([row_id, [values.get(f) for f in FIELDS]], separators=(",", ":"))
    message = (previous + content).encode()
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


# ------------------------------------------------------------------------- scheme and head
@dataclass(frozen=True)
class Scheme:
    """How a log's rows are hashed: ``sha256`` (no key) or ``hmac-sha256`` with ``key_id``."""

    name: str
    key_id: str | None = None

    @classmethod
    def for_key(cls, key: bytes | None) -> Scheme:
        return cls(SCHEME_SHA256) if key is None else cls(SCHEME_HMAC, key_fingerprint(key))

    @property
    def keyed(self) -> bool:
        return self.name == SCHEME_HMAC

    def describe(self) -> str:
        return f"{self.name}, key id {self.key_id}" if self.keyed else f"{self.name}, unkeyed"


def _read_scheme(db: sqlite3.Connection, where: Path) -> Scheme | None:
    """The scheme recorded in ``meta``; None when none is (a log from before schemes, or new).

    Raises:
        AuditMetaError: when ``meta`` holds something this code never writes.
    """
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
        return None
    meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
    if not meta:
        return None
    name, key_id = meta.get("scheme"), meta.get("key_id")
    if name == SCHEME_SHA256 and key_id is None:
        return Scheme(name)
    if name == SCHEME_HMAC and key_id is not None and re.fullmatch("[0-9a-f]{16}", key_id):
        return Scheme(name, key_id)
    raise AuditMetaError(f"{where}: the audit log's meta table is not valid: {meta}")


def _mismatch(recorded: Scheme, wanted: Scheme) -> str | None:
    """Why a log hashed with ``recorded`` cannot be written or checked as ``wanted``."""
    if recorded == wanted:
        return None
    if recorded.keyed and not wanted.keyed:
        return (
            f"the log is keyed ({recorded.describe()}) but no key was given: set "
            "HISTOLITE_AUDIT_KEY_FILE (or --key-file) to the file that holds its key"
        )
    if wanted.keyed and not recorded.keyed:
        return (
            "the log is unkeyed (sha256) but a key was given: it was never keyed, or it was "
            "rebuilt without the key. An unkeyed log is not re-keyed in place: verify it, keep "
            "its `histolite audit head` line elsewhere, move it aside and start the keyed log "
            "on a new file"
        )
    return (
        f"the log is keyed with key id {recorded.key_id}, the key given has id {wanted.key_id}: "
        "a wrong key file, or the log was rebuilt with another key"
    )


def _head_signature(key: bytes, row: int, row_hash: str) -> str:
    """HMAC of an exported head, domain-separated from row hashes (they start with hex)."""
    message = f"{_HEAD_PREFIX}:{key_fingerprint(key)}:{row}:{row_hash}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Head:
    """A row's place in the chain, as exported (``str``) and as expected back (:meth:`parse`).

    ``row`` is None only for an expected head given as a bare hash; ``signature`` is an HMAC of
    ``row``, ``hash`` and ``key_id`` made with the log's key.
    """

    hash: str
    row: int | None
    key_id: str | None = None
    signature: str | None = None

    @classmethod
    def of(cls, row: int, row_hash: str, key: bytes | None = None) -> Head:
        if key is None:
            return cls(row_hash, row)
        return cls(row_hash, row, key_fingerprint(key), _head_signature(key, row, row_hash))

    @classmethod
    def parse(cls, text: str) -> Head:
        """``HASH``, ``HASH@ROW`` or the whole line ``histolite audit head`` printed.

        Raises:
            HistoliteError: the text is none of those.
        """
        match = _HEAD_RE.fullmatch(text.strip())
        row = int(match["row"]) if match and match["row"] else None
        if match is None or row == 0 or (match["sig"] and row is None):
            raise HistoliteError(
                f"--expect-head {text!r}: expected HASH (64 hex digits), HASH@ROW (row >= 1) or "
                "the line `histolite audit head` printed"
            )
        return cls(match["hash"], row, match["key_id"], match["sig"])

    def __str__(self) -> str:
        text = self.hash if self.row is None else f"{self.hash}@{self.row}"
        if self.signature is not None:
            text += f" {SCHEME_HMAC}:{self.key_id}:{self.signature}"
        return text


# ------------------------------------------------------------------------------ the writer
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
        """The row's columns, each text storable as UTF-8 (what the chain hash covers)."""
        values = {f: storable(getattr(self, f, None)) for f in FIELDS if f != "time"}
        values["time"] = time
        if self.probabilities is not None:
            values["probabilities"] = json.dumps(self.probabilities, sort_keys=True)
        return values


def storable(value: Any) -> Any:
    """``value`` with lone surrogates written as ``\\udcff`` escapes, other values as they are.

    A client's file name or slide name can carry one (JSON's ``"\\ud800"``, an undecodable
    multipart name); SQLite stores UTF-8 and refused the whole row, 500 included.
    """
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


class AuditLog:
    """One connection shared by the server's threads, writes serialised by a lock.

    Args:
        path: The SQLite file (created with its folder when missing).
        genesis: The first row's ``previous`` hash (the service passes its model cards' hash).
        key: The key from :func:`load_audit_key` for a keyed (HMAC-SHA256) chain, or None for
            an unkeyed one. A new log records which; an existing log must be opened the way it
            was created.

    Raises:
        AuditKeyError: the key (or its absence) does not fit the existing log.
        AuditUnavailable: the file cannot be opened or written.
    """

    def __init__(self, path: str | Path, genesis: str = "", *, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.genesis = genesis
        self._key = key
        self.scheme = Scheme.for_key(key)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=LOCK_WAIT_S
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._bind_scheme()
        except (OSError, sqlite3.Error) as exc:
            with contextlib.suppress(AttributeError, sqlite3.Error):
                self._db.close()
            raise AuditUnavailable(f"{self.path}: cannot open the audit log ({exc})") from exc
        except HistoliteError:
            self._db.close()
            raise
        self._inode = self._identity()
        self._lock = threading.Lock()
        self.failure: str | None = None

    def _bind_scheme(self) -> None:
        """Record this log's scheme when it is new; refuse to write one made another way.

        In one write transaction, so that workers starting together agree on one record.
        A log from before schemes (rows, no record) was unkeyed: it is recorded as such.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            recorded = _read_scheme(self._db, self.path)
            if recorded is None:
                has_rows = self._db.execute("SELECT 1 FROM audit LIMIT 1").fetchone() is not None
                recorded = Scheme(SCHEME_SHA256) if has_rows else self.scheme
                self._db.executemany(
                    "INSERT INTO meta (name, value) VALUES (?, ?)",
                    [("scheme", recorded.name)]
                    + ([("key_id", recorded.key_id)] if recorded.key_id else []),
                )
            problem = _mismatch(recorded, self.scheme)
            if problem is not None:
                raise AuditKeyError(f"{self.path}: {problem}")
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _identity(self) -> tuple[int, int] | None:
        try:
            stat_ = self.path.stat()
        except OSError:
            return None
        return stat_.st_dev, stat_.st_ino

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
                    digest = chain_hash(previous, row_id, values, self._key)
                    self._db.execute(
                        f"INSERT INTO audit (id, {', '.join(FIELDS)}, previous_hash, row_hash) "
                        f"VALUES ({', '.join('?' * (len(FIELDS) + 3))})",
                        (row_id, *(values[f] for f in FIELDS), previous, digest),
                    )
                    previous = digest
                self._db.execute("COMMIT")
            except BaseException as exc:
                # whatever failed, never leave the transaction open: BEGIN IMMEDIATE holds the
                # database's write lock, and every later BEGIN on this connection would fail
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
                    raise
                reason = str(exc) if isinstance(exc, sqlite3.Error) else _one_line(exc)
                self.failure = storable(reason)
                raise AuditUnavailable(f"audit log unavailable: {self.failure}") from exc
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

    def head(self) -> Head | None:
        """The newest row as an exportable head (signed when keyed); None while empty.

        Not verified: it is what this log holds now, e.g. for the service to print at shutdown
        so that a log collector keeps it. ``histolite audit head`` verifies before printing.
        """
        with self._lock:
            last = self._db.execute(
                "SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1"
            ).fetchone()
        return None if last is None else Head.of(int(last[0]), str(last[1]), self._key)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------------------- the readers
def _one_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _open_read_only(db_path: str | Path) -> sqlite3.Connection:
    db_path = Path(db_path)
    if not db_path.is_file():
        raise HistoliteError(f"{db_path}: audit database not found")
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)


def _read_log(db_path: str | Path) -> tuple[Scheme, list[dict[str, Any]]]:
    """The recorded scheme (``sha256`` when none is) and every row, in id order."""
    db = _open_read_only(db_path)
    try:
        scheme = _read_scheme(db, Path(db_path)) or Scheme(SCHEME_SHA256)
        rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY id").fetchall()
    except sqlite3.DatabaseError as exc:
        raise HistoliteError(f"{db_path}: not a histolite audit database ({exc})") from exc
    finally:
        db.close()
    return scheme, [dict(zip(COLUMNS, row, strict=True)) for row in rows]


def audit_scheme(db_path: str | Path) -> Scheme:
    """How the log at ``db_path`` is hashed, as recorded (``sha256`` for logs before schemes)."""
    return _read_log(db_path)[0]


@dataclass(frozen=True)
class AuditCheck:
    """What :func:`check_audit` found.

    Attributes:
        rows: Rows that check out, counting from row 1 (all of them when ``problem`` is None).
        problem: Why the log fails, naming the first bad row; None when it passes.
        scheme: The scheme the log records.
        content_checked: False for a keyed log checked without its key: then only the rows'
            order, their links and the expected head were checked, not what the rows say.
        head: The newest row (signed when the key was given); None for an empty log.
        refused: The key does not fit the log, so no row was checked.
        notes: What this check could not detect, for the reader.
    """

    rows: int
    problem: str | None
    scheme: Scheme
    content_checked: bool
    head: Head | None = None
    refused: bool = False
    notes: tuple[str, ...] = ()


def check_audit(
    db_path: str | Path,
    *,
    key: bytes | None = None,
    genesis: str | None = None,
    expect_head: Head | str | None = None,
    allow_without_key: bool = False,
) -> AuditCheck:
    """Check a log's chain with its key, and that it still holds ``expect_head``.

    A keyed log without the key can be checked only for order and links, which is what a
    holder of an exported head (without the key) can still learn: that is allowed when
    ``expect_head`` is given or ``allow_without_key``, and refused otherwise so that "intact"
    never means less than it says.

    Raises:
        HistoliteError: the file is not an audit database, ``expect_head`` is malformed, or a
            keyed log is to be checked without its key and without an expected head.
    """
    expected = Head.parse(expect_head) if isinstance(expect_head, str) else expect_head
    try:
        scheme, rows = _read_log(db_path)
    except AuditMetaError as exc:
        return AuditCheck(0, str(exc), Scheme("unknown"), content_checked=False, refused=True)
    wanted = Scheme.for_key(key)
    content_checked = True
    notes: list[str] = []
    if scheme.keyed and key is None:
        if expected is None and not allow_without_key:
            raise HistoliteError(
                f"{db_path}: the log is keyed ({scheme.describe()}): give --key-file to check "
                "it, or --expect-head to check its order and links against an exported head"
            )
        content_checked = False
        notes.append(
            "keyed log checked without its key: the rows' order, links and the expected head "
            "were checked, edited row contents were NOT (give --key-file for that)"
        )
    else:
        problem = _mismatch(scheme, wanted)
        if problem is not None:
            return AuditCheck(0, problem, scheme, content_checked=False, refused=True)
    if not scheme.keyed:
        notes.append(
            "unkeyed chain (sha256): it shows accidental corruption and naive edits only; "
            "anyone who can write the file can append rows, edit and rehash, or rebuild it and "
            "it still verifies. Key the log (HISTOLITE_AUDIT_KEY_FILE) and keep heads elsewhere "
            "(histolite audit head) to check with --expect-head"
        )
    good, problem = _check_rows(rows, key, genesis, content_checked)
    if problem is None and expected is not None:
        problem = _check_head(rows, expected, key, scheme, notes)
    if expected is None:
        notes.append(
            "no --expect-head: the newest rows could have been removed"
            + (", and a holder of the key could have rewritten the log," if scheme.keyed else "")
            + " without this check showing it"
        )
    head = None
    if rows and problem is None:
        last = rows[-1]
        head = Head.of(last["id"], last["row_hash"], key if content_checked else None)
    return AuditCheck(good, problem, scheme, content_checked, head, notes=tuple(notes))


def _check_rows(
    rows: list[dict[str, Any]], key: bytes | None, genesis: str | None, content: bool
) -> tuple[int, str | None]:
    """(rows that hold, None) or (rows before the first bad one, why it is bad)."""
    previous = None
    for expected_id, record in enumerate(rows, start=1):
        if record["id"] != expected_id:
            return expected_id - 1, f"row {expected_id}: missing (found id {record['id']} instead)"
        if previous is None:
            if genesis is not None and record["previous_hash"] != genesis:
                return 0, "row 1: does not start from the served models' card hash"
        elif record["previous_hash"] != previous:
            return expected_id - 1, f"row {expected_id}: not chained to row {expected_id - 1}"
        if content:
            digest = chain_hash(record["previous_hash"], record["id"], record, key)
            if not hmac.compare_digest(digest, str(record["row_hash"])):
                return expected_id - 1, f"row {expected_id}: content changed after it was written"
        previous = record["row_hash"]
    return len(rows), None


def _check_head(
    rows: list[dict[str, Any]],
    expected: Head,
    key: bytes | None,
    scheme: Scheme,
    notes: list[str],
) -> str | None:
    """Why the chain no longer holds the exported head, or None when it does."""
    if expected.signature is not None:
        if key is None:
            notes.append("the expected head's signature was not checked (no key given)")
        elif expected.key_id != scheme.key_id:
            return (
                f"the expected head was signed with key id {expected.key_id}, this log's key is "
                f"{scheme.key_id}: it was exported from another log or with another key"
            )
        else:
            assert expected.row is not None  # Head.parse requires a row with a signature
            good = _head_signature(key, expected.row, expected.hash)
            if not hmac.compare_digest(good, expected.signature):
                return "the expected head's signature is wrong: it was not exported with this key"
    short = expected.hash[:16]
    if expected.row is None:
        found = [r["id"] for r in rows if r["row_hash"] == expected.hash]
        if not found:
            return (
                f"expected head {short}... is not in the chain: the log was truncated, rebuilt "
                "or replaced since the head was exported"
            )
        notes.append(f"expected head {short}... found at row {found[0]}")
        return None
    if expected.row > len(rows):
        return (
            f"row {expected.row}: absent, the log has {len(rows)} row(s): it was truncated or "
            "rolled back since the head was exported"
        )
    if rows[expected.row - 1]["row_hash"] != expected.hash:
        return (
            f"row {expected.row}: its hash is not the expected head {short}...: the chain was "
            "rebuilt or replaced since the head was exported"
        )
    return None


def verify_audit(
    db_path: str | Path,
    genesis: str | None = None,
    *,
    key: bytes | None = None,
    expect_head: Head | str | None = None,
) -> tuple[int, str | None]:
    """(rows checked, None) when the chain holds, else (rows, why the first broken row is).

    The short form of :func:`check_audit`, whose notes say what was not checked.
    """
    check = check_audit(db_path, key=key, genesis=genesis, expect_head=expect_head)
    return check.rows, check.problem


def _neutralise(value: Any) -> Any:
    """Spreadsheets run cells that start with = + - @: prefix those with a quote."""
    if isinstance(value, str) and value.startswith(_INJECTION_PREFIXES):
        return "'" + value
    return value


def export_audit_csv(db_path: str | Path, out: str | Path) -> int:
    """Write every audit row to CSV (atomically, formula-safe); returns the number of rows.

    Needs no key and checks nothing (``histolite audit verify`` does): the CSV keeps both
    hashes of each row, so with :func:`audit_scheme` (and the key, for a keyed log) the chain
    can be recomputed from the export.
    """
    _, records = _read_log(db_path)
    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows([_neutralise(r[c]) for c in COLUMNS] for r in records)
    return len(records)
