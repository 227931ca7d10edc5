"""A run killed with SIGKILL mid-epoch and resumed equals the run that was never interrupted."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import write_config

from histolite.config import load_config
from histolite.train import train_run

EPOCHS = 4
SLOW_TRAINING = """
import sys, time
import lightning as L
from histolite.config import load_config
from histolite.train import train_run

class Slow(L.Callback):  # makes 'mid-epoch' a wide target for the kill
    def on_train_batch_end(self, *args):
        time.sleep(0.25)

cfg = load_config(sys.argv[1])
train_run(cfg, sys.argv[2], progress=False, extra_callbacks=[Slow()])
"""


def _val_metrics(run: Path) -> dict[int, tuple[float, float]]:
    """epoch -> (val_acc, val_loss), over every (re)start of the run."""
    found = {}
    for path in sorted(run.glob("logs/csv*/metrics.csv")):
        with path.open() as fh:
            for row in csv.DictReader(fh):
                if row.get("val_acc"):
                    found[int(row["epoch"])] = (float(row["val_acc"]), float(row["val_loss"]))
    return found


def _epoch_of_last_checkpoint(run: Path) -> int:
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return -1
    try:
        return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # being written right now
        return -1


@pytest.mark.slow
def test_kill_then_resume_equals_an_uninterrupted_run(tmp_path: Path, synthetic_dir: Path) -> None:
    config = write_config(
        tmp_path / "cfg.yaml",
        synthetic_dir,
        trainer={"max_epochs": EPOCHS, "deterministic": True},
        augment={"vflip": True, "rot90": True},
        data={"num_workers": 0},
    )
    reference = train_run(load_config(config), tmp_path / "reference", progress=False)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAINING, str(config), str(killed)], env=env
    )
    deadline = time.monotonic() + 120
    while _epoch_of_last_checkpoint(killed) < 1 and process.poll() is None:
        assert time.monotonic() < deadline, "the first epochs never finished"
        time.sleep(0.1)
    time.sleep(0.6)  # a few slowed batches into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    interrupted_at = _epoch_of_last_checkpoint(killed)
    assert interrupted_at < EPOCHS - 1, "the run finished before it was killed"

    resumed_cfg = load_config(killed / "config.yaml")
    train_run(resumed_cfg, killed, resume=True, progress=False)

    assert (killed / "split.csv").read_text() == (reference / "split.csv").read_text()
    expected, got = _val_metrics(reference), _val_metrics(killed)
    assert sorted(got) == sorted(expected) == list(range(EPOCHS))
    for epoch in range(EPOCHS):
        assert got[epoch][0] == pytest.approx(expected[epoch][0], abs=1e-6), epoch
        assert got[epoch][1] == pytest.approx(expected[epoch][1], rel=1e-4), epoch
    final = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    target = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.allclose(final[k].float(), target[k].float(), atol=1e-5) for k in target)
