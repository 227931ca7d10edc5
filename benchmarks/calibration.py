"""Calibration, abstention and out-of-distribution flags of the shipped student, measured.

For each run (the Kather student recipe, grouped split, one per seed): evaluate the test split
uncalibrated, ``histolite calibrate`` it on validation (temperature, abstention target 0.99),
evaluate again; then the same on the two synthetic stain shifts of ``stain_robustness.py``, and
the AUROC of each out-of-distribution score for (a) wrong vs right test answers and (b) test
tiles vs shifted copies of them (stain shifts, blur, pen ink, JPEG). Finally the FP32 export's
served probabilities against evaluate's calibrated ones on every test tile.

    python benchmarks/calibration.py --runs runs/kd/grouped/student_s1 runs/kd/grouped/student_s2 \\
        runs/kd/grouped/student_s3 --out runs/calibration

Calibration is fitted in each run folder (``RUN/calibration.json``), as a user would.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHIFTS = ("hed_amounts", "stain_colours")
OOD_SETS = ("hed_amounts", "stain_colours", "blur", "pen_ink", "jpeg")


def blur(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Out of focus: a Gaussian blur of 2.5 px (1.2 um at 0.495 um/px)."""
    return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2.5)))


def pen_ink(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two thick marker strokes (blue, green or black ink over the tissue)."""
    image = Image.fromarray(pixels).convert("RGBA")
    ink = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(ink)
    colours = ((30, 60, 170, 190), (20, 130, 60, 190), (25, 25, 25, 200))
    side = image.size[0]
    for _ in range(2):
        points = [tuple(int(v) for v in rng.integers(0, side, 2)) for _ in range(3)]
        draw.line(points, fill=colours[int(rng.integers(len(colours)))], width=side // 8)
    return np.asarray(Image.alpha_composite(image, ink).convert("RGB"))


def jpeg(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A JPEG at quality 10 (a badly compressed scan or screenshot)."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=10)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def transformed_split(
    split_csv: Path, out: Path, name: str, change: Callable[[np.ndarray, np.random.Generator], Any]
) -> Path:
    """A split CSV of changed copies of the run's test tiles (built once, seeded)."""
    from histolite.data.images import load_rgb, save_rgb
    from histolite.data.splits import read_split_csv

    target = out / name / "split.csv"
    if target.is_file():
        return target
    rng = np.random.default_rng(0)
    rows = []
    for sample in read_split_csv(split_csv).subset("test").samples:
        copy = out / name / sample.class_name / (sample.path.stem + ".png")
        copy.parent.mkdir(parents=True, exist_ok=True)
        save_rgb(change(load_rgb(sample.path), rng), copy)
        rows.append((copy.relative_to(out / name).as_posix(), sample.class_name, sample.group))
    with target.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "label", "group", "split"))
        writer.writerows((*row, "test") for row in rows)
    return target


def shifted_sets(run: Path, out: Path) -> dict[str, Path]:
    from stain_robustness import recoloured_test_split

    sets = {shift: recoloured_test_split(run / "split.csv", out, shift) for shift in SHIFTS}
    for name, change in (("blur", blur), ("pen_ink", pen_ink), ("jpeg", jpeg)):
        sets[name] = transformed_split(run / "split.csv", out, name, change)
    return sets


def predictions(run: Path, split_csv: Path, calibrated: bool) -> Any:
    from histolite.data.splits import read_split_csv
    from histolite.evaluate.inference import predict
    from histolite.models.loading import load_run

    loaded = load_run(run, calibrated=calibrated, device="cpu")
    samples = list(read_split_csv(split_csv).subset("test").samples)
    return predict(loaded, samples, progress=False)


def summary(preds: Any, threshold: float | None) -> dict[str, float | None]:
    from histolite.evaluate.metrics import calibration_metrics, selective_summary

    calibration = calibration_metrics(preds.probs, preds.labels)
    selective = selective_summary(preds.probs, preds.labels)["accuracy_at_coverage"]
    answered = preds.probs.max(axis=1) >= threshold if threshold is not None else None
    right = preds.probs.argmax(axis=1) == preds.labels
    return {
        "accuracy": float(right.mean()),
        "ece": calibration["ece"],
        "nll": calibration["nll"],
        "brier": calibration["brier"],
        "acc_at_90": selective["0.9"],
        "coverage": float(answered.mean()) if answered is not None else None,
        "answered_accuracy": float(right[answered].mean())
        if answered is not None and answered.any()
        else None,
    }


def ood_aurocs(test: Any, shifted: dict[str, Any]) -> dict[str, dict[str, float]]:
    from histolite.evaluate.metrics import auroc
    from histolite.uncertainty import ood_scores

    scores = ood_scores(test.logits)
    right = test.probs.argmax(axis=1) == test.labels
    table = {name: {"wrong_vs_right": auroc(s[right], s[~right])} for name, s in scores.items()}
    for set_name, preds in shifted.items():
        theirs = ood_scores(preds.logits)
        for name, s in scores.items():
            table[name][set_name] = auroc(s, theirs[name])
    return table


def served_difference(run: Path, out: Path) -> float:
    """Largest |served - evaluate| calibrated probability over every test tile (FP32 export)."""
    from histolite.data.images import load_rgb
    from histolite.data.splits import read_split_csv
    from histolite.evaluate.inference import predict_image
    from histolite.export.onnx import export_run
    from histolite.models.loading import load_run
    from histolite.runtime.classifier import OnnxClassifier

    export = out / "exports" / run.name
    if not (export / "model.json").is_file():
        export_run(run, export, progress=False)
    model, loaded = OnnxClassifier(export), load_run(run, device="cpu")
    worst = 0.0
    for sample in read_split_csv(run / "split.csv").subset("test").samples:
        pixels = load_rgb(sample.path)
        served = model.predict(pixels).probabilities
        worst = max(worst, float(np.abs(served - predict_image(loaded, pixels)).max()))
    return worst


def measure(run: Path, out: Path) -> dict[str, Any]:
    from histolite.evaluate.calibration import calibrate_run

    result: dict[str, Any] = {"run": str(run)}
    test_csv = run / "split.csv"
    result["before"] = summary(predictions(run, test_csv, calibrated=False), None)
    spec = calibrate_run(run, target=0.99, progress=False)
    result["temperature"] = spec["temperature"]
    result["abstain_below"] = spec["abstain_below"]
    result["validation"] = {
        "ece_before": spec["validation"]["before"]["ece"],
        "ece_after": spec["validation"]["after"]["ece"],
        "abstention": spec["abstention"],
        "ood": spec["ood"],
    }
    test = predictions(run, test_csv, calibrated=True)
    result["after"] = summary(test, spec["abstain_below"])
    sets = shifted_sets(run, out / "shifted")
    shifted = {name: predictions(run, path, calibrated=True) for name, path in sets.items()}
    for shift in SHIFTS:
        result[shift] = {
            "before": summary(predictions(run, sets[shift], calibrated=False), None),
            "after": summary(shifted[shift], spec["abstain_below"]),
        }
    result["ood_auroc"] = ood_aurocs(test, shifted)
    result["served_max_abs_diff"] = served_difference(run, out)
    return result


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: list[dict[str, Any]]) -> str:
    def column(*keys: str) -> list[float]:
        values = []
        for r in results:
            value: Any = r
            for key in keys:
                value = value[key]
            values.append(value)
        return values

    lines = [
        "| test set | state | accuracy | ECE | NLL | Brier | acc. @ 90% coverage | "
        "coverage at threshold | accuracy of answered |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("grouped test", ("before",), ("after",))]
    rows += [(shift, (shift, "before"), (shift, "after")) for shift in SHIFTS]
    for name, before, after in rows:
        for state, keys in (("uncalibrated", before), ("calibrated", after)):
            cells = []
            for metric in ("accuracy", "ece", "nll", "brier", "acc_at_90"):
                cells.append(_mean_sd(column(*keys, metric)))
            for metric in ("coverage", "answered_accuracy"):
                values = [v for v in column(*keys, metric) if v is not None]
                cells.append(_mean_sd(values) if values else "n/a")
            lines.append(f"| {name} | {state} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Temperatures: " + ", ".join(f"{t:.3f}" for t in column("temperature")),
        "Abstention thresholds (validation accuracy of answered >= 0.99): "
        + ", ".join("none" if t is None else f"{t:.4f}" for t in column("abstain_below")),
        "Out-of-distribution score chosen on validation: "
        + ", ".join(str(r["validation"]["ood"].get("score")) for r in results),
        "Served FP32 vs evaluate, largest probability difference over every test tile: "
        + ", ".join(f"{v:.2e}" for v in column("served_max_abs_diff")),
        "",
        "AUROC per score (mean over runs): wrong vs right test answers, and test tiles vs "
        "their shifted copies:",
        "",
        "| score | wrong vs right | " + " | ".join(OOD_SETS) + " |",
        "|---|---:|" + "---:|" * len(OOD_SETS),
    ]
    for score in results[0]["ood_auroc"]:
        cells = [
            f"{statistics.mean(column('ood_auroc', score, key)):.3f}"
            for key in ("wrong_vs_right", *OOD_SETS)
        ]
        lines.append(f"| {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for run in args.runs:
        cached = args.out / f"{run.name}.json"
        if not cached.is_file():
            cached.write_text(json.dumps(measure(run, args.out), indent=2))
        results.append(json.loads(cached.read_text()))
        print(f"{run}: done", flush=True)
    text = table(results)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
