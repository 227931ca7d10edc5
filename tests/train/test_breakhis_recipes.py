"""The BreakHis / IDC recipes: valid, runnable on a fixture of the real layout, honest splits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from support import make_breakhis, make_idc
from typer.testing import CliRunner

from histolite.cli import app
from histolite.config import load_config
from histolite.errors import ModelError
from histolite.models import create_model
from histolite.models.registry import BreakHisHead, count_parameters

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DESIGN_B = ["breakhis_resnet18", "breakhis_wide_resnet50", "breakhis_resnext50"]
TINY = [
    "data.image_size=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.pretrained=false",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
]


@pytest.mark.parametrize("name", DESIGN_B)
def test_design_b_recipes_follow_the_paper(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml", ["data.root=/x"])
    assert (cfg.data.dataset, cfg.data.magnification, cfg.data.labels) == (
        "breakhis",
        200,
        "binary",
    )
    assert cfg.data.split_by == "group" and cfg.data.image_size == 224
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.data.batch_size) == ("adamax", 5e-4, 32)
    assert cfg.scheduler.name == "exponential" and cfg.trainer.max_epochs == 15
    assert cfg.augment.hflip and cfg.augment.vflip and cfg.augment.rotation_degrees == 20
    assert cfg.model.head == "breakhis" and cfg.model.pretrained


def test_breakhis_head_is_built_for_design_b() -> None:
    model = create_model("resnet18", 2, head="breakhis")
    assert isinstance(model[-1], BreakHisHead)
    assert [m.out_features for m in model[-1] if hasattr(m, "out_features")] == [256, 100, 2]
    assert 11_000_000 < count_parameters(model) < 11_500_000


def test_failed_download_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub answers but the download breaks: the error still says what to do."""
    import timm

    from histolite.models import pretrained

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("connection reset")

    monkeypatch.setattr(pretrained, "_host_reachable", lambda *args, **kwargs: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(ModelError, match=r"model\.weights=PATH, or set model\.pretrained=false"):
        create_model("densenet201", 2, pretrained=True)


@pytest.fixture(scope="module")
def breakhis_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_breakhis(tmp_path_factory.mktemp("bh"), images_per_magnification=3)


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("breakhis_resnet18", []),
        ("breakhis_abmil", ["mil.patch={size: 16, stride: 8}", "data.batch_size=4"]),
    ],
)
def test_recipe_trains_on_the_breakhis_layout_with_a_patient_split(
    tmp_path: Path, breakhis_root: Path, recipe: str, extra: list[str]
) -> None:
    run = tmp_path / recipe
    args = ["train", str(CONFIGS / f"{recipe}.yaml"), "--out", str(run), "--no-progress"]
    for item in [f"data.root={breakhis_root}", *TINY, *extra]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((run / "split_report.json").read_text())
    assert report["split_by"] == "group" and report["group_kind"] == "patient"
    assert report["shared_groups"] == 0
    splits = report["splits"]
    assert sum(splits[s]["images"] for s in ("train", "val", "test")) == 12 * 3  # 200X only
    test_report = json.loads((run / "reports" / "test" / "report.json").read_text())
    assert test_report["level"] == ("bag" if "abmil" in recipe else "image")
    assert "weighted_f1" in test_report
    assert (run / "reports" / "test" / "confusion_matrix.png").is_file()


def test_idc_abmil_recipe_validates() -> None:
    cfg = load_config(CONFIGS / "idc_abmil.yaml", ["data.root=/x"])
    assert cfg.mil is not None and cfg.mil.patch.size == 50
    assert cfg.data.split_by == "group" and cfg.data.group_regex == r"^(\d+)_bag"


def test_idc_abmil_recipe_trains_on_patient_bags(tmp_path: Path) -> None:
    patients = tuple(str(8000 + i) for i in range(8))
    idc = make_idc(tmp_path / "idc", patients=patients, per_label=5)
    bags = tmp_path / "bags"
    result = CliRunner().invoke(
        app,
        [
            "data", "bags", str(idc), "--dataset", "idc", "--positive", "idc", "--within-group",
            "--grid", "2", "--tile-size", "50", "--bags-per-class", "16", "--out", str(bags),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    args = ["train", str(CONFIGS / "idc_abmil.yaml"), "--out", str(run), "--no-progress"]
    for item in [f"data.root={bags}", *TINY, "data.batch_size=4"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((run / "split_report.json").read_text())
    assert report["split_by"] == "group" and report["shared_groups"] == 0
    groups = {row["group"] for row in csv.DictReader((run / "split.csv").open())}
    assert groups <= set(patients)  # bag names carry the patient id into the split
