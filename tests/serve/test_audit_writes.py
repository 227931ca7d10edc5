"""A failed audit write must not break the next one (review finding F).

``AuditLog.write`` rolled back only on ``sqlite3.Error``: a lone surrogate in a field (a client's
file or slide name) raised ``UnicodeEncodeError`` between ``BEGIN IMMEDIATE`` and ``COMMIT``,
left the transaction open with the database's write lock held, and every later write failed with
"cannot start a transaction within a transaction".
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import histolite.serve.audit as audit
from histolite.serve.audit import AuditLog, AuditUnavailable, Entry, verify_audit

GENESIS = "d" * 64


def _details(db: Path) -> list[tuple[str, str | None, str | None]]:
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT outcome, filename, detail FROM audit ORDER BY id"
        ).fetchall()


def test_a_lone_surrogate_is_stored_escaped_and_the_next_write_works(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    log = AuditLog(db, genesis=GENESIS)
    log.write(
        [Entry(kind="request", outcome="rejected 422", filename="\udcff.png", detail="a\ud800")]
    )
    log.write([Entry(kind="request", outcome="ok", filename="next.png")])
    assert log.failure is None and log.healthy()
    log.close()
    assert _details(db) == [
        ("rejected 422", "\\udcff.png", "a\\ud800"),  # escaped text, not dropped
        ("ok", "next.png", None),
    ]
    assert verify_audit(db, GENESIS) == (2, None)  # the hash covers what was stored


def test_any_failure_inside_the_transaction_rolls_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only sqlite3.Error: whatever fails between BEGIN and COMMIT ends the transaction,
    and the caller gets AuditUnavailable (a 503), not a 500 with the write lock still held."""
    db = tmp_path / "audit.db"
    log = AuditLog(db, genesis=GENESIS)
    log.write([Entry(kind="request", outcome="ok")])
    real = audit.chain_hash

    def broken(*args: object, **kwargs: object) -> str:
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(audit, "chain_hash", broken)
    with pytest.raises(AuditUnavailable, match="UnicodeEncodeError"):
        log.write([Entry(kind="request", outcome="lost"), Entry(kind="request", outcome="lost")])
    assert not log._db.in_transaction
    with sqlite3.connect(db, timeout=0.1) as other:  # another worker can write: no lock held
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    monkeypatch.setattr(audit, "chain_hash", real)
    log.write([Entry(kind="request", outcome="after")])
    assert log.failure is None and log.healthy()  # a write that succeeds clears the failure
    log.close()
    outcomes = [outcome for outcome, _, _ in _details(db)]
    assert outcomes == ["ok", "after"]  # the failed write left nothing half-written
    assert verify_audit(db, GENESIS) == (2, None)
