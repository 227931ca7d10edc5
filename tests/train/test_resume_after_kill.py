"""A run killed with SIGKILL mid-epoch and resumed equals the run that was never interrupted."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import write_config

from histolite.config import load_config
from histolite.train import train_run

EPOCHS = 4
KILL_EPOCH = 2  # the child dies after this epoch's first batch; last.ckpt holds epoch 1
KILLED_MID_EPOCH = f"""
import json, os, signal, sys
import lightning as L
from histolite.config import load_config
from histolite.train import train_run

class KillMidEpoch(L.Callback):  # SIGKILL at a known point, not after a guessed delay
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == {KILL_EPOCH} and batch_idx == 0:
            with open(sys.argv[3], "w") as fh:  # where it died, for the test to check
                json.dump({{"epoch": trainer.current_epoch, "batches_done": batch_idx + 1,
                            "batches": trainer.num_training_batches}}, fh)
            os.kill(os.getpid(), signal.SIGKILL)

cfg = load_config(sys.argv[1])
train_run(cfg, sys.argv[2], progress=False, extra_callbacks=[KillMidEpoch()])
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
    return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])


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
    where = tmp_path / "killed_at.json"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_EPOCH, str(config), str(killed), str(where)], env=env
    )
    try:
        process.wait(timeout=600)  # a hang guard only: the kill point does not depend on time
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("the child never reached its kill point")
    assert process.returncode == -signal.SIGKILL
    died = json.loads(where.read_text())
    assert died["epoch"] == KILL_EPOCH and died["batches_done"] < died["batches"], died
    interrupted_at = _epoch_of_last_checkpoint(killed)
    assert interrupted_at == KILL_EPOCH - 1, "last.ckpt is not the last finished epoch"
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
