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
    audit_db: Path | None = typer.Option(None, help=H("audit_db")),
    threads: int | None = typer.Option(None, help=H("threads")),
    slide_root: Path | None = typer.Option(None, help=H("slide_root")),
    jobs_dir: Path | None = typer.Option(None, help=H("jobs_dir")),
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
    from histolite.serve.repository import load_repository

    given: dict[str, Any] = {
        "model_dir": model_dir,
        "api_key": api_key,
        "audit_db": audit_db,
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
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        proxy_headers=forwarded_allow_ips is not None,
        forwarded_allow_ips=forwarded_allow_ips,
        timeout_graceful_shutdown=shutdown_timeout,
    )


@audit_app.command("export")
def audit_export(
    out: Path = typer.Option(..., "--out", help="CSV file to write."),
    db: Path = typer.Option(
        Path("histolite_audit.sqlite"),
        envvar="HISTOLITE_AUDIT_DB",
        help="Audit database of `serve`.",
    ),
) -> None:
    """Export the audit log to CSV (cells that a spreadsheet would run are quoted)."""
    from histolite.serve.audit import export_audit_csv

    rows = export_audit_csv(db, out)
    typer.echo(f"wrote {rows} audit rows to {out}")


@audit_app.command("verify")
def audit_verify(
    db: Path = typer.Argument(..., help="Audit database of `serve`."),
) -> None:
    """Check the audit log's hash chain; exit 1 and name the first broken row if it is broken."""
    from histolite.serve.audit import verify_audit

    rows, problem = verify_audit(db)
    if problem is not None:
        typer.secho(f"{db}: BROKEN after {rows} good row(s): {problem}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"{db}: {rows} row(s), hash chain intact")
