"""``histolite export``, ``serve`` and ``audit ...``: from a run to a service."""

from __future__ import annotations

from pathlib import Path

import typer

from histolite.cli.app import app, audit_app
from histolite.errors import HistoliteError


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


@app.command("serve")
def serve(
    model_dir: Path = typer.Argument(
        ...,
        help="An exported model folder, or a repository of them: DIR/<name>/<version>/.",
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, help="Port."),
    workers: int = typer.Option(1, help="Worker processes (each loads its own ONNX sessions)."),
    api_key: str | None = typer.Option(
        None, envvar="HISTOLITE_API_KEY", help="Require this key (X-API-Key) for predictions."
    ),
    audit_db: Path = typer.Option(
        Path("histolite_audit.sqlite"), envvar="HISTOLITE_AUDIT_DB", help="SQLite audit log."
    ),
    threads: int | None = typer.Option(
        None, envvar="HISTOLITE_THREADS", help="ONNX Runtime threads per model."
    ),
    slide_root: Path | None = typer.Option(
        None,
        envvar="HISTOLITE_SLIDE_ROOT",
        help="Allow slide jobs (POST /v1/slides) for slides under this folder only.",
    ),
    jobs_dir: Path | None = typer.Option(
        None, envvar="HISTOLITE_JOBS_DIR", help="Slide job state and results (kept on restart)."
    ),
    docs: bool = typer.Option(
        False, "--docs", help="Serve Swagger UI at /docs (it loads its script from a CDN)."
    ),
    open_metadata: bool = typer.Option(
        False,
        "--open-metadata",
        help="With --api-key: leave /v1/models, /metrics and /docs open (default: key for all "
        "but /healthz, /readyz and the page).",
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
    max_pixels: int | None = typer.Option(
        None,
        "--max-pixels",
        envvar="HISTOLITE_MAX_PIXELS",
        help="Largest image accepted (width x height), else 413 [default: 60000000].",
    ),
    max_concurrent_predictions: int | None = typer.Option(
        None,
        "--max-concurrent-predictions",
        envvar="HISTOLITE_MAX_CONCURRENT_PREDICTIONS",
        min=1,
        help="Images decoded and classified at once per worker; others wait. Peak memory is "
        "about 75 MB + this x 8 bytes x --max-pixels [default: 2].",
    ),
) -> None:
    """Serve exported models: prediction API, upload page, slide jobs, metrics (no torch)."""
    import os

    import uvicorn

    from histolite.serve.repository import load_repository

    if slide_root is not None and workers > 1:
        raise HistoliteError(
            "slide jobs keep their queue in one process: use --workers 1 with --slide-root "
            "(or run a second service for slides)"
        )
    repo = load_repository(model_dir, threads)  # fail fast with a clear message
    for folder, error in sorted(repo.broken.items()):
        typer.secho(f"skipped {folder}: {error}", fg="yellow", err=True)
    typer.echo(
        "serving "
        + ", ".join(f"{n} v{repo.default_version(n)}" for n in repo.names())
        + f"; default {repo.names()[0]}"
    )
    os.environ["HISTOLITE_MODEL_DIR"] = str(model_dir.resolve())
    os.environ["HISTOLITE_AUDIT_DB"] = str(audit_db.resolve())
    for name, value in (
        ("HISTOLITE_API_KEY", api_key),
        ("HISTOLITE_THREADS", threads),
        ("HISTOLITE_SLIDE_ROOT", slide_root.resolve() if slide_root else None),
        ("HISTOLITE_JOBS_DIR", jobs_dir.resolve() if jobs_dir else None),
        ("HISTOLITE_DOCS", "1" if docs else None),
        ("HISTOLITE_OPEN_METADATA", "1" if open_metadata else None),
        ("HISTOLITE_MAX_PIXELS", max_pixels),
        ("HISTOLITE_MAX_CONCURRENT_PREDICTIONS", max_concurrent_predictions),
    ):
        if value:
            os.environ[name] = str(value)
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
