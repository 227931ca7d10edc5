"""The Kubernetes Indexed Job for slides: it parses, and its own commands, run here, work."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from support import REPO_ROOT

from histolite.runtime.classifier import OnnxClassifier
from histolite.slide.inference import SlideSettings, classify_slide

MANIFEST = REPO_ROOT / "deploy" / "k8s" / "slide-job.yaml"


def _jobs() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def _command(job: dict) -> str:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "-c"]
    return str(container["args"][0])


def test_indexed_job_runs_one_shard_per_index() -> None:
    jobs = _jobs()
    shards, merge = jobs["histolite-slide-shards"], jobs["histolite-slide-merge"]
    assert shards["kind"] == merge["kind"] == "Job"
    spec = shards["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    command = _command(shards)
    assert f'--shard "${{JOB_COMPLETION_INDEX}}/{spec["completions"]}"' in command
    assert f"histolite slide merge /results --shards {spec['completions']} --wait" in (
        _command(merge)
    )
    # the merge names the shards' model: an earlier run's markers on the volume are not merged
    model_dir = re.search(r"--model (\S+)", command)
    assert model_dir and f"--model {model_dir.group(1)} " in _command(merge) + " "
    for job in (shards, merge):
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001
        (container,) = pod["containers"]
        assert container["image"] == "histolite-serve:0.1.0"
        assert container["resources"]["limits"]


def _run(
    command: str, slides: Path, models: Path, results: Path, index: int | None
) -> subprocess.CompletedProcess[str]:
    """The manifest's shell command with its volumes mapped to folders here (no waiting)."""
    local = re.sub(
        r"--wait \d+",
        "--wait 0",
        command.replace("/slides", str(slides))
        .replace("/models", str(models))
        .replace("/results", str(results)),
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = str(index)
    return subprocess.run(["sh", "-c", local], env=env, capture_output=True, text=True)


def test_the_job_commands_shard_and_merge_a_slide_volume(
    model: OnnxClassifier, mosaic: tuple[Path, list], tmp_path: Path
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(mosaic[0], slides / "case1.tif")
    shutil.copy(mosaic[0], slides / "case2.tiff")
    jobs = _jobs()
    count = jobs["histolite-slide-shards"]["spec"]["completions"]
    results = tmp_path / "results"
    models = tmp_path / "models"  # the image's /models repository
    shutil.copytree(model.model_dir, models / "kather-student" / "1")
    (slides / "broken.svs").write_text("not a slide")
    shard_job, merge_job = (
        _command(jobs["histolite-slide-shards"]),
        _command(jobs["histolite-slide-merge"]),
    )
    for index in range(count - 1):
        done = _run(shard_job, slides, models, results, index)
        assert done.returncode == 1 and "broken.svs" in done.stderr  # the pod fails, as in k8s
    # every slide folder is complete but the last shard has not run: merge refuses, saying so
    early = _run(merge_job, slides, models, results, None)
    assert early.returncode != 0 and f"shards [{count - 1}] of {count} have not finished" in (
        " ".join(early.stderr.split())
    )
    # the merge's answers after its --wait end the Job: a retry would wait as long again
    merge_spec = jobs["histolite-slide-merge"]["spec"]
    assert merge_spec["template"]["spec"]["restartPolicy"] == "Never"
    (rule,) = merge_spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["operator"] == "In"
    assert early.returncode in rule["onExitCodes"]["values"]
    assert not (results / "case1" / "tiles.csv").exists()
    last = _run(shard_job, slides, models, results, count - 1)
    assert last.returncode == 1 and "broken.svs" in last.stderr
    # a retried pod redoes only the slide that failed
    first = (results / "case1" / "shards" / f"0-of-{count}" / "summary.json").stat().st_mtime_ns
    assert _run(shard_job, slides, models, results, 0).returncode == 1
    retry = json.loads((results / f"batch_summary.0-of-{count}.json").read_text())
    assert [d["resumed"] for d in retry["classified"]] == [True, True]
    assert [f["slide"] for f in retry["failed"]] == [str(slides / "broken.svs")]
    assert (
        results / "case1" / "shards" / f"0-of-{count}" / "summary.json"
    ).stat().st_mtime_ns == first
    merge = _run(merge_job, slides, models, results, None)
    assert merge.returncode == 1 and "FAILED" in merge.stderr and "broken.svs" in merge.stderr
    assert merge.returncode in rule["onExitCodes"]["values"]
    batch = json.loads((results / "batch_summary.json").read_text())
    assert sorted(Path(d["slide"]).name for d in batch["classified"]) == ["case1.tif", "case2.tiff"]
    reference = tmp_path / "reference"
    settings = SlideSettings()  # the manifest's defaults: the model's tile, min tissue 0.5
    classify_slide(slides / "case1.tif", model, reference, settings, progress=False)
    for stem in ("case1", "case2"):
        with (results / stem / "tiles.csv").open() as fh:
            merged = list(csv.reader(fh))
        with (reference / "case1" / "tiles.csv").open() as fh:
            expected = list(csv.reader(fh))
        assert merged == expected
        assert (results / stem / "heatmap.png").is_file()
        assert len(list((results / stem / "shards").iterdir())) == count
