"""``histolite compare``: several runs on the same test data in one table (Markdown + JSON).

One command gives the papers' comparison tables: accuracy, balanced accuracy, macro F1,
per-class precision/recall/F1, parameters, weight size and CPU throughput at batch 1 and 64.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from histolite.errors import HistoliteError
from histolite.evaluate.report import evaluate_run
from histolite.evaluate.speed import images_per_second
from histolite.fileio import write_json, write_text
from histolite.models import count_parameters, weight_size_mb
from histolite.models.loading import load_run, require_classifier


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
) -> list[dict[str, Any]]:
    """Evaluate each run on the same data; write compare.md / compare.json into ``out``."""
    run_dirs = [Path(r) for r in runs]
    labels = _run_names(run_dirs, names)
    out = Path(out)
    rows: list[dict[str, Any]] = []
    for label, run in zip(labels, run_dirs, strict=True):
        loaded = load_run(run, device="cpu")
        classifier = require_classifier(loaded, "compare")
        report = evaluate_run(
            run, data, out / "reports" / Path(label).name, split=split, progress=progress
        )
        size = loaded.spec.image_size
        row: dict[str, Any] = {
            "name": label,
            "run": str(run),
            "model": loaded.spec.model_name,
            "level": report["level"],
            "n": report["n"],
            "accuracy": report["accuracy"],
            "balanced_accuracy": report["balanced_accuracy"],
            "macro_f1": report["macro_f1"],
            "weighted_f1": report["weighted_f1"],
            "per_class": report["per_class"],
            "parameters": count_parameters(classifier),
            "size_mb": weight_size_mb(classifier),
            "image_size": size,
            "cpu_images_per_s_b1": images_per_second(
                classifier, size, 1, min_seconds=speed_seconds, max_iters=200
            ),
            "cpu_images_per_s_b64": images_per_second(
                classifier, size, 64, min_seconds=speed_seconds
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


def format_comparison(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| run | model | accuracy | balanced acc. | macro F1 | parameters | size MB | "
        "CPU img/s b1 | CPU img/s b64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['model']} | {r['accuracy']:.4f} | {r['balanced_accuracy']:.4f} | "
            f"{r['macro_f1']:.4f} | {r['parameters']:,} | {r['size_mb']:.2f} | "
            f"{r['cpu_images_per_s_b1']:.0f} | {r['cpu_images_per_s_b64']:.0f} |"
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
        f"{rows[0]['level'] if rows else 'image'}-level metrics on n={n} test items; "
        "CPU throughput measured on random input, single process.",
    ]
    return "\n".join(lines) + "\n"
