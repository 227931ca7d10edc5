"""The audit chain against a hostile writer: someone who can write the database file.

Each forgery here (a row appended with the public ``chain_hash``, a row edited and the rows
after it rehashed, the chain rebuilt from a zero genesis) passes ``histolite audit verify`` on an
unkeyed log, which is all the log had before keys: that is the finding, kept as a test of what
an unkeyed chain does not promise. With a key the same forgeries fail. An exported head
(``histolite audit head``) then finds truncation and rebuilds even by someone holding the key.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from histolite.serve.audit import (
    COLUMNS,
    FIELDS,
    AuditKeyError,
    AuditLog,
    Entry,
    Head,
    chain_hash,
    check_audit,
    key_fingerprint,
    load_audit_key,
    verify_audit,
)
from histolite.serve.settings import ServeSettings

CliRunner = Callable[[list[str]], tuple[int, str, str]]
GENESIS = "c" * 64  # stands for the served model cards' hash
ROWS = 5


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`audit verify/head` read HISTOLITE_AUDIT_KEY_FILE: each test says whether it has a key."""
    monkeypatch.delenv("HISTOLITE_AUDIT_KEY_FILE", raising=False)


def _key_file(folder: Path, name: str = "audit.key") -> Path:
    path = folder / name
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return _key_file(tmp_path)


def _log(db: Path, key: bytes | None, rows: int = ROWS) -> Path:
    log = AuditLog(db, genesis=GENESIS, key=key)
    for i in range(rows):
        log.write([Entry(kind="prediction", outcome="ok", predicted_class=f"class{i}")])
    log.close()
    return db


def _rows(db: Path) -> list[dict[str, Any]]:
    connection = sqlite3.connect(db)
    rows = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY id").fetchall()
    connection.close()
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows]


def _rewrite(db: Path, rows: list[dict[str, Any]], *, scheme: str | None = None) -> None:
    """What a hostile writer does: drop the triggers, replace every row (and maybe ``meta``)."""
    connection = sqlite3.connect(db)
    for trigger in ("audit_no_update", "audit_no_delete", "meta_no_update", "meta_no_delete"):
        connection.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    connection.execute("DELETE FROM audit")
    connection.executemany(
        f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
        [tuple(row[c] for c in COLUMNS) for row in rows],
    )
    if scheme is not None:
        connection.execute("DELETE FROM meta")
        connection.execute("INSERT INTO meta VALUES ('scheme', ?)", (scheme,))
    connection.commit()
    connection.close()


def _rechain(
    rows: list[dict[str, Any]], start: int, previous: str, key: bytes | None = None
) -> list[dict[str, Any]]:
    """Recompute hashes from row ``start`` (1-based) on, as ``chain_hash`` lets anyone do."""
    out = [dict(r) for r in rows]
    for record in out[start - 1 :]:
        record["previous_hash"] = previous
        record["row_hash"] = previous = chain_hash(previous, record["id"], record, key)
    return out


def forge_append(db: Path, key: bytes | None = None) -> None:
    """(a) a row appended with the public chain function."""
    rows = _rows(db)
    last = rows[-1]
    fake: dict[str, Any] = dict.fromkeys(FIELDS)
    fake.update(id=last["id"] + 1, time=last["time"], kind="prediction", outcome="ok")
    fake["predicted_class"] = "forged"
    fake["previous_hash"] = last["row_hash"]
    fake["row_hash"] = chain_hash(last["row_hash"], fake["id"], fake, key)
    _rewrite(db, [*rows, fake])


def forge_edit_and_rehash(db: Path, key: bytes | None = None) -> None:
    """(b) row 2 edited, then it and every row after it rehashed."""
    rows = _rows(db)
    rows[1]["predicted_class"] = "edited"
    _rewrite(db, _rechain(rows, 2, rows[0]["row_hash"], key))


def forge_rebuild(db: Path, key: bytes | None = None) -> None:
    """(c) the whole chain rebuilt from the zero genesis, with one row changed."""
    rows = _rows(db)
    rows[2]["outcome"] = "rejected 415"
    _rewrite(db, _rechain(rows, 1, "0" * 64, key))


FORGERIES = {
    "append": (forge_append, f"row {ROWS + 1}: content changed"),
    "edit+rehash": (forge_edit_and_rehash, "row 2: content changed"),
    "rebuild": (forge_rebuild, "row 1: content changed"),
}


# ------------------------------------------------------------------------- the forgeries
@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forgery_passes_an_unkeyed_chain(
    forgery: str, tmp_path: Path, run_cli: CliRunner
) -> None:
    """The finding: without a key, the chain is only as strong as no one recomputing it."""
    db = _log(tmp_path / "audit.db", key=None)
    forge, _ = FORGERIES[forgery]
    forge(db)
    rows = ROWS + (forgery == "append")
    assert verify_audit(db) == (rows, None)
    code, out, err = run_cli(["audit", "verify", str(db)])
    assert code == 0 and f"{rows} row(s), hash chain intact (sha256, unkeyed)" in out
    # ... and verify says so, rather than letting "intact" promise more
    assert "anyone who can write the file can append rows, edit and rehash, or rebuild" in err


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forgery_fails_a_keyed_chain(
    forgery: str, tmp_path: Path, key_file: Path, run_cli: CliRunner
) -> None:
    key = load_audit_key(key_file)
    db = _log(tmp_path / "audit.db", key=key)
    assert verify_audit(db, key=key) == (ROWS, None)
    forge, broken = FORGERIES[forgery]
    forge(db)  # the writer has no key: it can only use the public, unkeyed function
    _, problem = verify_audit(db, key=key)
    assert problem is not None and broken in problem
    code, _, err = run_cli(["audit", "verify", str(db), "--key-file", str(key_file)])
    assert code == 1 and "BROKEN" in err and broken in err
    with pytest.raises(AuditKeyError):  # nor can the service go on writing a forged log
        AuditLog(db, genesis=GENESIS)


def test_a_downgrade_to_an_unkeyed_chain_is_refused_with_the_key(
    tmp_path: Path, key_file: Path, run_cli: CliRunner
) -> None:
    """A rebuild that also rewrites ``meta`` to say "sha256" verifies only without the key."""
    key = load_audit_key(key_file)
    db = _log(tmp_path / "audit.db", key=key)
    rows = _rows(db)
    rows[0]["predicted_class"] = "edited"
    _rewrite(db, _rechain(rows, 1, GENESIS), scheme="sha256")
    assert verify_audit(db) == (ROWS, None)  # reads as a healthy unkeyed log ...
    code, _, err = run_cli(["audit", "verify", str(db), "--key-file", str(key_file)])
    assert code == 1 and "NOT VERIFIED" in err and "rebuilt without the key" in err
    with pytest.raises(AuditKeyError, match="unkeyed"):  # ... and the keyed service stops
        AuditLog(db, genesis=GENESIS, key=key)


def test_a_tampered_meta_table_is_not_verified(
    tmp_path: Path, key_file: Path, run_cli: CliRunner
) -> None:
    db = _log(tmp_path / "audit.db", key=load_audit_key(key_file))
    _rewrite(db, _rows(db), scheme="md5")
    code, _, err = run_cli(["audit", "verify", str(db), "--key-file", str(key_file)])
    assert code == 1 and "NOT VERIFIED" in err and "meta table is not valid" in err


# ----------------------------------------------------------------- keys that do not fit
def test_a_wrong_key_is_refused(tmp_path: Path, key_file: Path, run_cli: CliRunner) -> None:
    db = _log(tmp_path / "audit.db", key=load_audit_key(key_file))
    other = _key_file(tmp_path, "other.key")
    other_id = key_fingerprint(load_audit_key(other))
    with pytest.raises(AuditKeyError, match=f"the key given has id {other_id}"):
        AuditLog(db, genesis=GENESIS, key=load_audit_key(other))
    code, _, err = run_cli(["audit", "verify", str(db), "--key-file", str(other)])
    assert code == 1 and "NOT VERIFIED" in err and "wrong key file" in err
    code, _, err = run_cli(["audit", "head", str(db), "--key-file", str(other)])
    assert code == 1 and "no head exported" in err


def test_a_keyed_log_needs_its_key_and_an_unkeyed_one_refuses_a_key(
    tmp_path: Path, key_file: Path, run_cli: CliRunner
) -> None:
    key = load_audit_key(key_file)
    keyed = _log(tmp_path / "keyed.db", key=key)
    with pytest.raises(AuditKeyError, match=r"keyed .* but no key was given"):
        AuditLog(keyed, genesis=GENESIS)
    code, _, err = run_cli(["audit", "verify", str(keyed)])
    assert code == 2 and "give --key-file" in err  # cannot check: not "intact", not "broken"
    # the variable `serve` reads is read by verify too
    os.environ["HISTOLITE_AUDIT_KEY_FILE"] = str(key_file)  # undone by the autouse fixture
    code, out, _ = run_cli(["audit", "verify", str(keyed)])
    assert code == 0 and f"hash chain intact (hmac-sha256, key id {key_fingerprint(key)})" in out
    del os.environ["HISTOLITE_AUDIT_KEY_FILE"]

    unkeyed = _log(tmp_path / "unkeyed.db", key=None)
    with pytest.raises(AuditKeyError, match="not re-keyed in place"):
        AuditLog(unkeyed, genesis=GENESIS, key=key)
    code, _, err = run_cli(["audit", "verify", str(unkeyed), "--key-file", str(key_file)])
    assert code == 1 and "NOT VERIFIED" in err and "unkeyed (sha256) but a key was given" in err
    # the refused open changed nothing: the log still takes rows the way it was made
    _log(unkeyed, key=None, rows=1)
    assert verify_audit(unkeyed) == (ROWS + 1, None)


def test_a_log_from_before_schemes_is_unkeyed(tmp_path: Path, key_file: Path) -> None:
    """Logs written before ``meta`` existed were unkeyed: they stay so, and refuse a key."""
    db = _log(tmp_path / "old.db", key=None)
    connection = sqlite3.connect(db)
    connection.executescript("DROP TRIGGER meta_no_delete; DROP TRIGGER meta_no_update;")
    connection.execute("DROP TABLE meta")
    connection.commit()
    connection.close()
    assert verify_audit(db) == (ROWS, None)
    with pytest.raises(AuditKeyError, match="unkeyed"):
        AuditLog(db, genesis=GENESIS, key=load_audit_key(key_file))
    _log(db, key=None, rows=1)
    assert verify_audit(db) == (ROWS + 1, None)
    assert check_audit(db).scheme.name == "sha256"


# ------------------------------------------------------------------------ exported heads
def _head(run_cli: CliRunner, db: Path, *key: str) -> str:
    code, out, err = run_cli(["audit", "head", str(db), *key])
    assert code == 0, err
    return out.strip()


def test_head_round_trips_into_verify(tmp_path: Path, key_file: Path, run_cli: CliRunner) -> None:
    key = load_audit_key(key_file)
    db = _log(tmp_path / "audit.db", key=key)
    line = _head(run_cli, db, "--key-file", str(key_file))
    head = Head.parse(line)
    assert head.row == ROWS and head.key_id == key_fingerprint(key) and head.signature
    assert str(head) == line
    # the service goes on writing; the head kept earlier is still in the chain
    _log(db, key=key, rows=3)
    for expected in (line, f"{head.hash}@{head.row}", head.hash):
        code, out, err = run_cli(
            ["audit", "verify", str(db), "--key-file", str(key_file), "--expect-head", expected]
        )
        assert code == 0, err
        assert f"{ROWS + 3} row(s), hash chain intact" in out and "expected head is in" in out
    # without the key (a SIEM holding only the line): order, links and head; contents not
    code, out, err = run_cli(["audit", "verify", str(db), "--expect-head", line])
    assert code == 0 and "row contents NOT checked" in out
    assert "signature was not checked" in err
    # an unkeyed log's head is a bare HASH@ROW, and round-trips too
    plain = _log(tmp_path / "plain.db", key=None)
    line = _head(run_cli, plain)
    assert line == f"{_rows(plain)[-1]['row_hash']}@{ROWS}"
    assert run_cli(["audit", "verify", str(plain), "--expect-head", line])[0] == 0


def test_expect_head_finds_truncation_even_by_a_key_holder(
    tmp_path: Path, key_file: Path, run_cli: CliRunner
) -> None:
    key = load_audit_key(key_file)
    db = _log(tmp_path / "audit.db", key=key)
    line = _head(run_cli, db, "--key-file", str(key_file))
    _rewrite(db, _rows(db)[:3])  # the newest rows removed: a valid, shorter chain
    keyed = ["audit", "verify", str(db), "--key-file", str(key_file)]
    assert run_cli(keyed)[0] == 0  # the key alone cannot tell
    code, _, err = run_cli([*keyed, "--expect-head", line])
    assert code == 1 and f"row {ROWS}: absent" in err and "truncated" in err
    code, _, err = run_cli(["audit", "verify", str(db), "--expect-head", line])  # no key
    assert code == 1 and "truncated" in err
    # rolled back and regrown by the key holder: as many rows again, but other ones
    _log(db, key=key, rows=ROWS - 3)
    assert run_cli(keyed)[0] == 0
    code, _, err = run_cli([*keyed, "--expect-head", line])
    assert code == 1 and f"row {ROWS}: its hash is not the expected head" in err
    code, _, err = run_cli([*keyed, "--expect-head", line.split("@")[0]])
    assert code == 1 and "is not in the chain" in err


@pytest.mark.parametrize("forgery", ["edit+rehash", "rebuild"])
def test_expect_head_finds_a_rebuild_even_by_a_key_holder(
    forgery: str, tmp_path: Path, key_file: Path, run_cli: CliRunner
) -> None:
    key = load_audit_key(key_file)
    db = _log(tmp_path / "audit.db", key=key)
    line = _head(run_cli, db, "--key-file", str(key_file))
    forge, _ = FORGERIES[forgery]
    if forgery == "rebuild":  # from the real genesis: the key holder knows it too
        rows = _rows(db)
        rows[2]["outcome"] = "rejected 415"
        _rewrite(db, _rechain(rows, 1, GENESIS, key))
    else:
        forge(db, key)
    keyed = ["audit", "verify", str(db), "--key-file", str(key_file)]
    assert run_cli(keyed)[0] == 0  # a key holder's rewrite verifies with the key ...
    code, _, err = run_cli([*keyed, "--expect-head", line])  # ... but not against the head
    assert code == 1 and "rebuilt or replaced" in err
    code, _, err = run_cli(["audit", "verify", str(db), "--expect-head", line])  # no key
    assert code == 1 and "rebuilt or replaced" in err


def test_an_unkeyed_head_finds_a_rebuild(tmp_path: Path, run_cli: CliRunner) -> None:
    """On an unkeyed log an exported head is the only defence, and covers the contents."""
    db = _log(tmp_path / "audit.db", key=None)
    line = _head(run_cli, db)
    forge_edit_and_rehash(db)
    assert run_cli(["audit", "verify", str(db)])[0] == 0
    code, _, err = run_cli(["audit", "verify", str(db), "--expect-head", line])
    assert code == 1 and "rebuilt or replaced" in err


def test_a_forged_or_foreign_head_is_refused(
    tmp_path: Path, key_file: Path, run_cli: CliRunner
) -> None:
    key = load_audit_key(key_file)
    db = _log(tmp_path / "audit.db", key=key)
    head = Head.parse(_head(run_cli, db, "--key-file", str(key_file)))
    keyed = ["audit", "verify", str(db), "--key-file", str(key_file), "--expect-head"]
    forged = Head(head.hash, head.row, head.key_id, "0" * 64)
    code, _, err = run_cli([*keyed, str(forged)])
    assert code == 1 and "signature is wrong" in err
    foreign = Head.of(head.row or 0, head.hash, b"k" * 32)
    code, _, err = run_cli([*keyed, str(foreign)])
    assert code == 1 and "signed with key id" in err
    for bad in ("nothex@3", f"{head.hash}@0", f"{head.hash} hmac-sha256:{head.key_id}:{'0' * 64}"):
        code, _, err = run_cli([*keyed, bad])
        assert code == 2 and "expected HASH (64 hex digits), HASH@ROW" in err


def test_head_refuses_an_empty_or_broken_log(
    tmp_path: Path, key_file: Path, run_cli: CliRunner
) -> None:
    key = load_audit_key(key_file)
    empty = _log(tmp_path / "empty.db", key=key, rows=0)
    code, _, err = run_cli(["audit", "head", str(empty), "--key-file", str(key_file)])
    assert code == 2 and "no rows yet" in err
    db = _log(tmp_path / "audit.db", key=key)
    forge_append(db)
    code, out, err = run_cli(["audit", "head", str(db), "--key-file", str(key_file)])
    assert code == 1 and out == "" and "BROKEN" in err and "no head exported" in err


# ------------------------------------------------------------------ the key stays secret
def test_the_key_never_reaches_the_database(tmp_path: Path, key_file: Path) -> None:
    key = load_audit_key(key_file)
    db = tmp_path / "audit.db"
    log = AuditLog(db, genesis=GENESIS, key=key)
    log.write([Entry(kind="prediction", outcome="ok", detail="x" * 100)])
    files = [p for p in tmp_path.iterdir() if p.name.startswith("audit.db")]
    written = b"".join(p.read_bytes() for p in files)  # the WAL too, before a checkpoint
    log.close()
    written += db.read_bytes()
    assert key not in written and bytes.fromhex(key.decode()) not in written
    assert key_fingerprint(key).encode() in written  # what is stored instead


def test_export_keeps_working_on_a_keyed_log(
    tmp_path: Path, key_file: Path, run_cli: CliRunner
) -> None:
    db = _log(tmp_path / "audit.db", key=load_audit_key(key_file))
    code, out, _ = run_cli(["audit", "export", "--db", str(db), "--out", str(tmp_path / "a.csv")])
    assert code == 0 and f"wrote {ROWS} audit rows" in out and "hmac-sha256, key id" in out
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == ROWS + 1


# --------------------------------------------------------------------------- key files
def test_whitespace_around_the_key_is_not_part_of_it(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("k" * 40)
    b.write_text("  " + "k" * 40 + "\r\n")
    a.chmod(0o400)
    b.chmod(0o440)
    assert load_audit_key(a) == load_audit_key(b) == b"k" * 40


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "audit key file not found"),
        ("dir", 0o700, "not a regular file"),
        ("", 0o600, "holds 0 bytes of key"),
        ("short\n", 0o600, "holds 5 bytes of key (whitespace around it is ignored); at least 32"),
        ("k" * 40, 0o644, "can be read or written by every user (mode 0644)"),
        ("k" * 40, 0o602, "(mode 0602)"),
    ],
)
def test_key_file_errors_are_clear(
    tmp_path: Path, content: str | None, mode: int, message: str, run_cli: CliRunner
) -> None:
    path = tmp_path / "audit.key"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    if content is not None:
        path.chmod(mode)
    with pytest.raises(AuditKeyError, match=r"audit\.key") as error:
        load_audit_key(path)
    assert message in str(error.value)
    db = _log(tmp_path / "audit.db", key=None)
    code, _, err = run_cli(["audit", "verify", str(db), "--key-file", str(path)])
    assert code == 2 and message in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_file_is_named(tmp_path: Path) -> None:
    path = _key_file(tmp_path)
    path.chmod(0o000)
    with pytest.raises(AuditKeyError, match="cannot read the audit key file"):
        load_audit_key(path)


def test_the_key_file_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by default; read from HISTOLITE_AUDIT_KEY_FILE; '' (what to_env writes) is off."""
    assert ServeSettings(model_dir=tmp_path).audit_key_file is None
    monkeypatch.setenv("HISTOLITE_AUDIT_KEY_FILE", str(tmp_path / "k"))
    settings = ServeSettings(model_dir=tmp_path)
    assert settings.audit_key_file == tmp_path / "k"
    assert settings.to_env()["HISTOLITE_AUDIT_KEY_FILE"] == str((tmp_path / "k").resolve())
    monkeypatch.setenv("HISTOLITE_AUDIT_KEY_FILE", "")
    assert ServeSettings(model_dir=tmp_path).audit_key_file is None
    assert "keying the audit log's chain (hmac-sha256)" in ServeSettings.help("audit_key_file")
