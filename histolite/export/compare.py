"""``histolite compare``: several runs on the same test data in one table (Markdown + JSON).

One command gives the papers' comparison tables, with what "small" costs next to every accuracy:
accuracy, balanced accuracy, macro F1, per-class precision/recall/F1, calibration (ECE, NLL,
Brier) and accuracy at 90% coverage, parameters, weight size,
multiply-accumulates at the served input size, PyTorch CPU throughput at batch 1 and 64, and the
throughput of the deployable ONNX INT8 export at batch 64. It lives in ``export`` because that
last column exports each run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from histolite.errors import HistoliteError
from histolite.evaluate.report import evaluate_run
from histolite.evaluate.speed import images_per_second
from histolite.export.onnx import export_run
from histolite.fileio import write_json, write_text
from histolite.models import count_macs, count_parameters, weight_size_mb
from histolite.models.loading import load_run, require_classifier
from histolite.runtime.classifier import OnnxClassifier
from histolite.runtime.speed import onnx_images_per_second


def _run_names(runs: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(runs):
            raise HistoliteError(f"{len(names)} names given for {len(runs)} runs")
        return list(names)
    chosen = [run.name for run in runs]
    if len(set(chosen)) != len(chosen):
        chosen = [str(run) for run in runs]
    return chosen


def compare_runs(
    runs: Sequence[str | Path],
    data: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    names: Sequence[str] | None = None,
    progress: bool = True,
    speed_seconds: float = 1.0,
    tta: bool = False,
    int8: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate each run on the same data; write compare.md / compare.json into ``out``.

    With ``int8`` each run is also exported to ONNX INT8 (parity-checked) under
    ``out/exports/<name>``, and that graph's CPU throughput at batch 64 is measured.
    """
    run_dirs = [Path(r) for r in runs]
    labels = _run_names(run_dirs, names)
    out = Path(out)
    rows: list[dict[str, Any]] = []
    for label, run in zip(labels, run_dirs, strict=True):
        loaded = load_run(run, device="cpu")
        classifier = require_classifier(loaded, "compare")
        report = evaluate_run(
            run, data, out / "reports" / Path(label).name, split=split, progress=progress, tta=tta
        )
        size = loaded.spec.image_size
        row: dict[str, Any] = {
            "name": label,
            "run": str(run),
            "model": loaded.spec.model_name,
            "level": report["level"],
            "n": report["n"],
            "accuracy": report["accuracy"],
            "accuracy_ci95": report["accuracy_ci95"],
            "test_time_augmentation": report["test_time_augmentation"],
            "balanced_accuracy": report["balanced_accuracy"],
            "macro_f1": report["macro_f1"],
            "weighted_f1": report["weighted_f1"],
            "per_class": report["per_class"],
            "calibrated": report["calibration"]["applied"],
            "ece": report["calibration_metrics"]["ece"],
            "ece_ci95": report["calibration_ci95"]["ece"],
            "nll": report["calibration_metrics"]["nll"],
            "brier": report["calibration_metrics"]["brier"],
            "accuracy_at_90_coverage": report["selective"]["accuracy_at_coverage"]["0.9"],
            "parameters": count_parameters(classifier),
            "size_mb": weight_size_mb(classifier),
            "image_size": size,
            "cpu_images_per_s_b1": images_per_second(
                classifier, size, 1, min_seconds=speed_seconds, max_iters=200
            ),
            "cpu_images_per_s_b64": images_per_second(
                classifier, size, 64, min_seconds=speed_seconds
            ),
            "macs": count_macs(classifier, size),
            "onnx_int8_images_per_s_b64": (
                _int8_throughput(run, out / "exports" / Path(label).name, speed_seconds, progress)
                if int8
                else None
            ),
        }
        if "image_level" in report:
            row["image_level_accuracy"] = {
                method: metrics["accuracy"] for method, metrics in report["image_level"].items()
            }
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", rows)
    write_text(out / "compare.md", format_comparison(rows))
    return rows


def _int8_throughput(run: Path, export_dir: Path, seconds: float, progress: bool) -> float | str:
    """Images/s of the run's ONNX INT8 export at batch 64, or why there is none."""
    if not export_dir.exists():
        try:
            export_run(run, export_dir, int8=True, progress=progress)
        except HistoliteError as exc:
            return f"n/a: {exc}"
    return onnx_images_per_second(OnnxClassifier(export_dir), 64, min_seconds=seconds)


def _rate(value: float | str | None) -> str:
    if isinstance(value, (int, float)):
        return f"{value:.0f}"
    return "n/a" if value is None or not value else "failed or refused (see compare.json)"


def _interval(row: dict[str, Any]) -> str:
    ci = row.get("accuracy_ci95")
    return f"[{ci['low']:.3f}, {ci['high']:.3f}; {ci['groups']} groups]" if ci else ""


def format_comparison(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| run | model | accuracy [95% CI over groups] | balanced acc. | macro F1 | parameters | "
        "size MB | MMACs | CPU img/s b1 | CPU img/s b64 | ONNX INT8 img/s b64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['model']} | {r['accuracy']:.4f} {_interval(r)} | "
            f"{r['balanced_accuracy']:.4f} | "
            f"{r['macro_f1']:.4f} | {r['parameters']:,} | {r['size_mb']:.2f} | "
            f"{r['macs'] / 1e6:.1f} | {r['cpu_images_per_s_b1']:.0f} | "
            f"{r['cpu_images_per_s_b64']:.0f} | {_rate(r.get('onnx_int8_images_per_s_b64'))} |"
        )
    lines += [
        "",
        "Calibration (top-label ECE, 15 bins; NLL; Brier) and selective accuracy:",
        "",
        "| run | calibrated | ECE [95% CI over groups] | NLL | Brier | accuracy at 90% coverage |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ci = r["ece_ci95"]
        lines.append(
            f"| {r['name']} | {'yes' if r['calibrated'] else 'no'} | {r['ece']:.4f} "
            f"[{ci['low']:.4f}, {ci['high']:.4f}] | {r['nll']:.4f} | {r['brier']:.4f} | "
            f"{r['accuracy_at_90_coverage']:.4f} |"
        )
    if any("image_level_accuracy" in r for r in rows):
        lines += [
            "",
            "Image-level accuracy (patch aggregation):",
            "",
            "| run | majority vote | mean probability |",
            "|---|---:|---:|",
        ]
        for r in rows:
            acc = r.get("image_level_accuracy")
            if acc:
                lines.append(
                    f"| {r['name']} | {acc['majority_vote']:.4f} | {acc['mean_probability']:.4f} |"
                )
    classes = list(rows[0]["per_class"]) if rows else []
    lines += [
        "",
        "Per-class precision / recall / F1:",
        "",
        "| class | " + " | ".join(r["name"] for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for cls in classes:
        cells = [
            "{precision:.3f} / {recall:.3f} / {f1:.3f}".format(**r["per_class"][cls]) for r in rows
        ]
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    n = rows[0]["n"] if rows else 0
    lines += [
        "",
        f"{rows[0]['level'] if rows else 'image'}-level metrics on n={n} test items"
        + (
            ", averaged over 8 dihedral views (--tta; the img/s columns are one view, so "
            "divide them by 8)"
            if any(r.get("test_time_augmentation") for r in rows)
            else ""
        )
        + "; MACs at "
        "each model's input size; throughput measured on random input, single process, "
        f"{torch.get_num_threads()} threads.",
    ]
    return "\n".join(lines) + "\n"
