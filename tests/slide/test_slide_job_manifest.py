"""The Kubernetes Indexed Job for slides: it parses, and its own commands, run here, work."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from support import REPO_ROOT

from histolite.export.runtime import OnnxClassifier
from histolite.export.slide_inference import SlideSettings, classify_slide

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
    assert "histolite slide merge /results/*/" in _command(merge)
    for job in (shards, merge):
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001
        (container,) = pod["containers"]
        assert container["image"] == "histolite-serve:0.1.0"
        assert container["resources"]["limits"]


def _run(command: str, slides: Path, models: Path, results: Path, index: int | None) -> None:
    """The manifest's shell command with its volumes mapped to folders here."""
    local = (
        command.replace("/slides", str(slides))
        .replace("/models", str(models))
        .replace("/results", str(results))
        .replace("sleep 30 && ", "")
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = str(index)
    result = subprocess.run(["sh", "-c", local], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


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
    for index in range(count):
        _run(_command(jobs["histolite-slide-shards"]), slides, models, results, index)
    _run(_command(jobs["histolite-slide-merge"]), slides, models, results, None)
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
