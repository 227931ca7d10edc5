"""Two-process DDP on CPU (gloo), launched the way users launch it: through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import write_config


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path: Path, synthetic_dir: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", synthetic_dir)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "histolite",
            "train",
            str(config),
            "--out",
            str(run),
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--no-progress",
            "--set",
            "trainer.max_epochs=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["devices"] == 2
    assert summary["epochs_completed"] == 2
    assert (run / "checkpoints" / "best.ckpt").is_file()
    metrics = (run / "logs" / "csv0" / "metrics.csv").read_text()
    assert "val_acc" in metrics
