"""``histolite evaluate``, ``explain``, ``predict`` and ``calibrate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from histolite.cli.app import app
from histolite.errors import HistoliteError


@app.command("evaluate")
def evaluate(
    run: Path = typer.Argument(..., help="Run directory from `histolite train`."),
    data: Path = typer.Option(..., "--data", help="Image folder, or a split CSV."),
    out: Path = typer.Option(..., "--out", help="Report folder."),
    split: str = typer.Option("test", help="Which split of a split CSV to evaluate."),
    checkpoint: str = typer.Option("best", help="best, last, or a checkpoint file name."),
    batch_size: int = typer.Option(64, help="Inference batch size."),
    tta: bool = typer.Option(
        False, "--tta", help="Average over the 8 flips/rotations of each image (8x slower)."
    ),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Write report.json, classification_report.csv, confusion matrices and training curves."""
    from histolite.evaluate.report import evaluate_run

    report = evaluate_run(
        run,
        data,
        out,
        split=split,
        checkpoint=checkpoint,
        batch_size=batch_size,
        tta=tta,
        progress=progress,
    )
    typer.echo(
        f"{report['level']}-level: accuracy {report['accuracy']:.4f}, balanced accuracy "
        f"{report['balanced_accuracy']:.4f}, macro F1 {report['macro_f1']:.4f} "
        f"(n={report['n']})"
    )
    ci = report["accuracy_ci95"]
    typer.echo(
        f"accuracy 95% interval [{ci['low']:.4f}, {ci['high']:.4f}], bootstrap over "
        f"{ci['groups']} {ci['unit']}" + (f" ({ci['warning']})" if "warning" in ci else "")
    )
    if "image_level" in report:
        for method, metrics in report["image_level"].items():
            typer.echo(f"image-level ({method}): accuracy {metrics['accuracy']:.4f}")
    at_threshold = report["calibration"].get("at_threshold")
    if at_threshold is not None:
        accuracy = at_threshold["accuracy_answered"]
        typer.echo(
            f"abstaining below {report['calibration']['abstain_below']:.3f} (fitted on "
            f"validation): answers {at_threshold['answered']} of {at_threshold['n']} images"
            + (f", accuracy {accuracy:.4f} on them" if accuracy is not None else "")
        )
    out_of_fold = report.get("crossfit", {}).get("out_of_fold")
    if out_of_fold is not None:
        typer.echo(
            f"out of fold (each training image by the fold model that never saw it): accuracy "
            f"{out_of_fold['accuracy']:.4f} (n={out_of_fold['n']})"
        )
        seen = out_of_fold.get("class_seen", {})
        if seen.get("n", out_of_fold["n"]) < out_of_fold["n"]:
            rest = (
                f"; on the other {seen['n']}: accuracy {seen['accuracy']:.4f}"
                if seen.get("accuracy") is not None
                else ""
            )
            typer.echo(
                f"  of which {out_of_fold['n'] - seen['n']} images of classes their fold model "
                f"never trained on{rest}"
            )
    typer.echo(f"report written to {out}")


@app.command("explain")
def explain(
    run: Path = typer.Argument(..., help="Run directory."),
    image: Path = typer.Argument(..., help="Image to explain."),
    out: Path = typer.Option(..., "--out", help="Overlay PNG to write (the image's size)."),
    method: str = typer.Option(
        "auto", help="auto (attention for MIL runs, else gradcam), attention or gradcam."
    ),
    target: str | None = typer.Option(
        None, help="Grad-CAM: class to explain (default: the predicted one)."
    ),
    layer: str | None = typer.Option(
        None, help="Grad-CAM: module name (default: the last spatial feature map)."
    ),
    alpha: float = typer.Option(0.45, help="Heatmap opacity, 0 to 1."),
    checkpoint: str = typer.Option("best", help="best, last, or a checkpoint file name."),
) -> None:
    """Draw where the model looked: MIL attention per patch, or Grad-CAM, over the image."""
    from histolite.data.images import load_rgb
    from histolite.evaluate.explain import explain_image, render_overlay
    from histolite.models.loading import load_run

    loaded = load_run(run, checkpoint)
    classes = loaded.spec.classes
    if target is not None and target not in classes:
        raise HistoliteError(f"--target {target!r} is not one of the run's classes {list(classes)}")
    pixels = load_rgb(image)
    explanation = explain_image(
        loaded,
        pixels,
        method=method,
        target=classes.index(target) if target is not None else None,
        layer=layer,
    )
    render_overlay(pixels, explanation.heatmap, out, alpha=alpha)
    typer.echo(
        json.dumps(
            {
                "file": str(image),
                "overlay": str(out),
                "method": explanation.method,
                "explained_class": classes[explanation.target],
                "predicted_class": classes[int(explanation.probs.argmax())],
                "probabilities": {
                    c: round(float(p), 6) for c, p in zip(classes, explanation.probs, strict=True)
                },
            }
        )
    )


@app.command("predict")
def predict(
    run: Path = typer.Argument(..., help="Run directory."),
    images: list[Path] = typer.Argument(..., help="Images to classify."),
    checkpoint: str = typer.Option("best", help="best, last, or a checkpoint file name."),
) -> None:
    """Classify images; one JSON line per image: file, class, probabilities, and how sure.

    With a calibrated run (`histolite calibrate`), probabilities are calibrated and each line
    says whether the answer is ``uncertain`` (below the abstention threshold) or
    ``out_of_distribution``; otherwise those are null.
    """
    from histolite.data.images import load_rgb
    from histolite.evaluate.inference import predict_image_scores
    from histolite.models.loading import load_run
    from histolite.uncertainty import UncertaintyPolicy, score, softmax

    loaded = load_run(run, checkpoint)
    if loaded.calibration_note:
        typer.secho(f"warning: {loaded.calibration_note}", fg="yellow", err=True)
    spec = loaded.calibration
    policy = UncertaintyPolicy.from_card(
        {"abstention": spec.abstention, "ood": spec.ood} if spec is not None else {}
    )
    for path in images:
        probs, logits = predict_image_scores(loaded, load_rgb(path))
        ood = None
        if policy.ood_score is not None:
            ood = float(np.mean(score(policy.ood_score, softmax(logits), logits)))
        best = int(probs.argmax())
        typer.echo(
            json.dumps(
                {
                    "file": str(path),
                    "class": loaded.spec.classes[best],
                    "probabilities": {
                        c: round(float(p), 6)
                        for c, p in zip(loaded.spec.classes, probs, strict=True)
                    },
                    "calibrated": spec is not None,
                    **policy.assess(probs, ood),
                }
            )
        )


@app.command("calibrate")
def calibrate(
    run: Path = typer.Argument(..., help="Run directory (with a validation split)."),
    checkpoint: str = typer.Option("best", help="best, last, or a checkpoint file name."),
    method: str = typer.Option(
        "temperature",
        help="temperature (one scalar: accuracy unchanged) or vector (a scale and bias per class).",
    ),
    target: float = typer.Option(
        0.99,
        help="Abstention: flag answers below the lowest confidence at which the answered "
        "validation images reach this accuracy.",
    ),
    ood_flag_rate: float = typer.Option(
        0.05, help="Out-of-distribution threshold: flag this fraction of validation images."
    ),
    batch_size: int = typer.Option(64, help="Inference batch size."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Fit calibration on the validation split (never test): RUN/calibration.json + figures.

    evaluate, predict, export and serving then use calibrated probabilities; re-export a run
    calibrated after its export (a stale export is refused when its run is on this machine).
    """
    from histolite.evaluate.calibration import calibrate_run

    result = calibrate_run(
        run,
        checkpoint=checkpoint,
        method=method,
        target=target,
        ood_flag_rate=ood_flag_rate,
        batch_size=batch_size,
        progress=progress,
    )
    before, after = result["validation"]["before"], result["validation"]["after"]
    scaling = (
        f"temperature {result['temperature']:.4f}"
        if result["temperature"] is not None
        else "vector scaling"
    )
    typer.echo(
        f"{scaling} on {result['validation']['images']} validation images: ECE "
        f"{before['ece']:.4f} -> {after['ece']:.4f}, NLL {before['nll']:.4f} -> "
        f"{after['nll']:.4f}, Brier {before['brier']:.4f} -> {after['brier']:.4f}"
    )
    abstention = result["abstention"]
    if abstention.get("threshold") is not None:
        typer.echo(
            f"abstain below confidence {abstention['threshold']:.4f}: validation accuracy "
            f"{abstention['accuracy']:.4f} on the {abstention['coverage']:.1%} answered"
        )
    else:
        typer.secho(f"no abstention threshold: {abstention.get('reason')}", fg="yellow")
    ood = result["ood"]
    if ood.get("score"):
        typer.echo(
            f"out-of-distribution score {ood['score']} (AUROC right vs wrong "
            f"{ood['auroc_right_vs_wrong'][ood['score']]:.3f}), flag below {ood['threshold']:.4f}"
        )
    typer.echo(f"wrote {result['file']}; figures in {Path(run) / 'calibration'}")
