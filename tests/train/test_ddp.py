"""Two-process DDP on CPU (gloo), launched the way users launch it: through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import write_config

DDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--no-progress"]


def _histolite(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "histolite", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


@pytest.mark.slow
def test_two_process_ddp_trains_a_teacher_and_distils_a_student(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    config = write_config(
        tmp_path / "cfg.yaml", synthetic_dir, data={"test_fraction": 0.25, "image_size": 24}
    )
    teacher = tmp_path / "teacher"
    sets = ["--set", "trainer.max_epochs=2", "--set", "trainer.checkpoint_every=1"]
    result = _histolite("train", str(config), "--out", str(teacher), *DDP, *sets)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((teacher / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["devices"] == 2
    assert summary["epochs_completed"] == 2
    assert "val_acc" in (teacher / "logs" / "csv0" / "metrics.csv").read_text()
    schedule = json.loads((teacher / "checkpoints" / "schedule.json").read_text())
    assert [item["epochs_done"] for item in schedule["saved"]] == [1, 2]

    student = tmp_path / "student"
    result = _histolite(
        "distill",
        str(config),
        "--teacher",
        str(teacher),
        "--out",
        str(student),
        *DDP,
        "--set",
        "trainer.max_epochs=2",
        "--set",
        "distill.mode=multipart",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((student / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 2
    # one process writes the switch log: one line per teacher checkpoint, not one per rank
    switches = json.loads((student / "teacher_switches.json").read_text())
    assert [(s["student_epoch"], s["checkpoint"]) for s in switches] == [
        (0, "epoch_001.ckpt"),
        (1, "epoch_002.ckpt"),
    ]
    report = json.loads((student / "reports" / "test" / "report.json").read_text())
    assert report["n"] == 16 and report["training_images_evaluated"] == 0
