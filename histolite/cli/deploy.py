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
    )


@app.command("serve")
def serve(
    model_dir: Path = typer.Argument(..., help="Exported model folder (histolite export)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, help="Port."),
    workers: int = typer.Option(1, help="Worker processes (each loads one ONNX session)."),
    api_key: str | None = typer.Option(
        None, envvar="HISTOLITE_API_KEY", help="Require this key (X-API-Key) for /v1/predict."
    ),
    audit_db: Path = typer.Option(Path("histolite_audit.sqlite"), help="SQLite audit log."),
    threads: int | None = typer.Option(None, help="ONNX Runtime threads per worker."),
) -> None:
    """Serve an exported model: prediction API, upload page, metrics (ONNX Runtime, no torch)."""
    import os

    import uvicorn

    from histolite.export.runtime import load_card

    load_card(model_dir)  # fail fast with a clear message
    os.environ["HISTOLITE_MODEL_DIR"] = str(model_dir.resolve())
    os.environ["HISTOLITE_AUDIT_DB"] = str(audit_db.resolve())
    if api_key:
        os.environ["HISTOLITE_API_KEY"] = api_key
    if threads:
        os.environ["HISTOLITE_THREADS"] = str(threads)
    uvicorn.run(
        "histolite.serve.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        proxy_headers=True,
    )


@audit_app.command("export")
def audit_export(
    out: Path = typer.Option(..., "--out", help="CSV file to write."),
    db: Path = typer.Option(Path("histolite_audit.sqlite"), help="Audit database of `serve`."),
) -> None:
    """Export the prediction audit log to CSV."""
    from histolite.serve.audit import export_audit_csv

    rows = export_audit_csv(db, out)
    typer.echo(f"wrote {rows} audit rows to {out}")
