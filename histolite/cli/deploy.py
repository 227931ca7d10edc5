"""``histolite export``, ``serve`` and ``audit ...``: from a run to a service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from histolite.cli.app import app, audit_app
from histolite.errors import HistoliteError
from histolite.serve.settings import ServeSettings


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="Run directory to export."),
    out: Path = typer.Option(
        ..., "--out", help="Model folder to create (model.onnx + model.json)."
    ),
    fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    int8: bool = typer.Option(
        False, "--int8", help="INT8 quantisation calibrated on training images."
    ),
    checkpoint: str = typer.Option("best", help="best, last, or a checkpoint file name."),
    name: str | None = typer.Option(
        None, help="Model name in the card (default: run folder name)."
    ),
    version: str = typer.Option("1", help="Model version in the card."),
    parity_samples: int = typer.Option(200, help="Images for the PyTorch vs ONNX parity check."),
    min_agreement: float = typer.Option(0.99, help="Required top-1 agreement with PyTorch."),
) -> None:
    """Export a run to ONNX (optionally INT8) with a model card; fails if parity fails."""
    if fmt != "onnx":
        raise HistoliteError(f"unsupported --format {fmt!r}; supported: onnx")
    from histolite.export.onnx import export_run

    result = export_run(
        run,
        out,
        int8=int8,
        checkpoint=checkpoint,
        name=name,
        version=version,
        parity_samples=parity_samples,
        min_agreement=min_agreement,
    )
    typer.echo(
        f"exported {'INT8' if int8 else 'FP32'} ONNX to {result.model_dir} "
        f"({result.size_bytes / 1e6:.2f} MB); parity on {result.parity_samples} images: "
        f"top-1 agreement {result.top1_agreement:.2%}, largest probability difference "
        f"{result.max_abs_probability_diff:.4f}"
        + (
            f", largest attention difference {result.max_abs_attention_diff:.2g}"
            if result.max_abs_attention_diff is not None
            else ""
        )
    )
    if result.explanation not in (None, "gradcam", "attention"):  # the page shows no heatmap
        typer.secho(str(result.explanation), fg="yellow", err=True)


H = ServeSettings.help  # one description and default per option, from the settings class


@app.command("serve")
def serve(
    model_dir: Path = typer.Argument(..., help=H("model_dir")),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, help="Port."),
    workers: int = typer.Option(1, help="Worker processes (each loads its own ONNX sessions)."),
    api_key: str | None = typer.Option(None, help=H("api_key")),
    audit_db: str | None = typer.Option(None, help=H("audit_db")),
    audit_key_file: str | None = typer.Option(None, help=H("audit_key_file")),
    threads: int | None = typer.Option(None, help=H("threads")),
    slide_root: str | None = typer.Option(None, help=H("slide_root")),
    jobs_dir: str | None = typer.Option(None, help=H("jobs_dir")),
    docs: bool | None = typer.Option(None, "--docs", help=H("docs")),
    open_metadata: bool | None = typer.Option(None, "--open-metadata", help=H("open_metadata")),
    max_pixels: int | None = typer.Option(None, "--max-pixels", help=H("max_pixels")),
    max_concurrent_predictions: int | None = typer.Option(
        None, "--max-concurrent-predictions", help=H("max_concurrent_predictions")
    ),
    forwarded_allow_ips: str | None = typer.Option(
        None,
        "--forwarded-allow-ips",
        help="Trust X-Forwarded-For only from these proxy addresses (comma-separated); by "
        "default it is ignored and clients are logged by their own address.",
    ),
    shutdown_timeout: int = typer.Option(
        10, "--shutdown-timeout", help="Seconds to finish requests after SIGTERM."
    ),
) -> None:
    """Serve exported models: prediction API, upload page, slide jobs, metrics (no torch).

    Every setting also reads its HISTOLITE_* variable (HISTOLITE_MAX_PIXELS, ...) when the
    option is not given; see docs/deploy.md for all of them.
    """
    import os

    import uvicorn
    from pydantic import ValidationError

    from histolite.config import format_validation_error
    from histolite.errors import ConfigError
    from histolite.serve.protocol import PROTOCOL_PATH
    from histolite.serve.repository import load_repository

    # paths stay strings until the settings see them: typer makes '' (off) into Path('.')
    given: dict[str, Any] = {
        "model_dir": model_dir,
        "api_key": api_key,
        "audit_db": audit_db,
        "audit_key_file": audit_key_file,
        "threads": threads,
        "slide_root": slide_root,
        "jobs_dir": jobs_dir,
        "docs": docs,
        "open_metadata": open_metadata,
        "max_pixels": max_pixels,
        "max_concurrent_predictions": max_concurrent_predictions,
    }
    try:  # the options given, then HISTOLITE_* variables, then the defaults
        settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "histolite serve options")) from exc
    if settings.slide_root is not None and workers > 1:
        raise HistoliteError(
            "slide jobs keep their queue in one process: use --workers 1 with --slide-root "
            "(or run a second service for slides)"
        )
    if settings.audit_key_file is not None:  # a bad key fails here, not in every worker
        from histolite.serve.audit import load_audit_key

        load_audit_key(settings.audit_key_file)
    repo = load_repository(settings.model_dir, settings.threads)  # fail fast, clearly
    for folder, error in sorted(repo.broken.items()):
        typer.secho(f"skipped {folder}: {error}", fg="yellow", err=True)
    typer.echo(
        "serving "
        + ", ".join(f"{n} v{repo.default_version(n)}" for n in repo.names())
        + f"; default {repo.names()[0]}"
    )
    os.environ.update(settings.to_env())  # how uvicorn's worker processes get the settings
    uvicorn.run(
        "histolite.serve.app:create_app_from_env",
        factory=True,
        http=PROTOCOL_PATH,  # closes connections dribbling a head; timeout from to_env()
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        proxy_headers=forwarded_allow_ips is not None,
        forwarded_allow_ips=forwarded_allow_ips,
        timeout_graceful_shutdown=shutdown_timeout,
        limit_concurrency=settings.max_connections,  # more: 503, before any body is read
    )


_KEY_FILE_HELP = (
    "File holding the audit log's key (as for `serve`: HISTOLITE_AUDIT_KEY_FILE). A keyed log "
    "needs it to check row contents and sign heads; an unkeyed log refuses it."
)


def _audit_key(key_file: Path | None) -> bytes | None:
    """The key in ``key_file``, held to the service's rules so a weak key fails here too."""
    from histolite.serve.audit import load_audit_key

    return None if key_file is None else load_audit_key(key_file)


@audit_app.command("export")
def audit_export(
    out: Path = typer.Option(..., "--out", help="CSV file to write."),
    db: Path = typer.Option(
        Path("histolite_audit.sqlite"),
        envvar="HISTOLITE_AUDIT_DB",
        help="Audit database of `serve`.",
    ),
) -> None:
    """Export the audit log to CSV (cells that a spreadsheet would run are quoted).

    The export checks nothing and needs no key: run `histolite audit verify` for that.
    """
    from histolite.serve.audit import audit_scheme, export_audit_csv

    rows = export_audit_csv(db, out)
    typer.echo(
        f"wrote {rows} audit rows to {out} (chain {audit_scheme(db).describe()}; not verified: "
        "histolite audit verify)"
    )


@audit_app.command("verify")
def audit_verify(
    db: Path = typer.Argument(..., help="Audit database of `serve`."),
    key_file: Path | None = typer.Option(
        None, "--key-file", envvar="HISTOLITE_AUDIT_KEY_FILE", help=_KEY_FILE_HELP
    ),
    expect_head: str | None = typer.Option(
        None,
        "--expect-head",
        help="HASH[@ROW], or the line `histolite audit head` printed earlier and kept "
        "elsewhere: the chain must still hold that hash (at that row). Finds truncation and "
        "rebuilt chains, even by a key holder, up to that row; works without the key.",
    ),
) -> None:
    """Check the audit log's chain; exit 1 and name the first broken row if it is broken.

    Exit 2 when it cannot be checked (a keyed log without --key-file or --expect-head).
    What the check could not detect is printed on stderr.
    """
    from histolite.serve.audit import check_audit

    check = check_audit(db, key=_audit_key(key_file), expect_head=expect_head)
    if check.refused:
        typer.secho(f"{db}: NOT VERIFIED: {check.problem}", fg="red", err=True)
        raise typer.Exit(1)
    if check.problem is not None:
        typer.secho(
            f"{db}: BROKEN after {check.rows} good row(s): {check.problem}", fg="red", err=True
        )
        raise typer.Exit(1)
    scheme = check.scheme.describe()
    if check.content_checked:
        typer.echo(f"{db}: {check.rows} row(s), hash chain intact ({scheme})")
    else:
        typer.echo(
            f"{db}: {check.rows} row(s) in order and linked ({scheme}); row contents NOT "
            "checked: no key"
        )
    if expect_head is not None:
        typer.echo(f"{db}: the expected head is in the chain")
    for note in check.notes:
        typer.secho(f"note: {note}", fg="yellow", err=True)


@audit_app.command("head")
def audit_head(
    db: Path = typer.Argument(..., help="Audit database of `serve`."),
    key_file: Path | None = typer.Option(
        None, "--key-file", envvar="HISTOLITE_AUDIT_KEY_FILE", help=_KEY_FILE_HELP
    ),
) -> None:
    """Print the log's head, HASH@ROW (signed with the key), to keep somewhere else.

    Keep the line outside the database's reach (a SIEM, a ticket, WORM storage), e.g. from a
    cron job: `histolite audit verify DB --expect-head LINE` later shows whether the log was
    truncated or rewritten up to that row. The chain is checked first (exit 1 if broken), so a
    head is never exported for a log that is already broken.
    """
    from histolite.serve.audit import check_audit

    check = check_audit(db, key=_audit_key(key_file), allow_without_key=True)
    if check.problem is not None:
        word = "NOT VERIFIED" if check.refused else f"BROKEN after {check.rows} good row(s)"
        typer.secho(f"{db}: {word}: {check.problem}; no head exported", fg="red", err=True)
        raise typer.Exit(1)
    if check.head is None:
        raise HistoliteError(f"{db}: the audit log has no rows yet: there is no head to export")
    typer.echo(str(check.head))
    signed = "signed with its key" if check.head.signature else "unsigned"
    typer.secho(
        f"{db}: head at row {check.head.row} ({check.scheme.describe()}; {signed}). Keep this "
        f"line elsewhere and check it later with: histolite audit verify {db} --expect-head "
        "'LINE'",
        err=True,
    )
    if not check.content_checked:
        typer.secho(
            "note: keyed log without its key: only the rows' order and links were checked",
            fg="yellow",
            err=True,
        )
