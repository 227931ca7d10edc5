"""The command line end to end, and the errors users see for bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image
from support import write_config


def test_end_to_end_synthetic_train_evaluate_predict(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    run_cli: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    data = tmp_path / "data"
    code, out, _ = run_cli(
        [
            "data",
            "synthetic",
            "--out",
            str(data),
            "--images-per-class",
            "12",
            "--size",
            "32",
            "--slides",
            "3",
        ],
    )
    assert code == 0 and "wrote synthetic dataset" in out

    code, out, _ = run_cli(["data", "check", str(data)])
    assert code == 0 and "no problems found" in out and "tumor: 12" in out

    split = tmp_path / "split.csv"
    code, out, _ = run_cli(
        [
            "data",
            "split",
            str(data),
            "--out",
            str(split),
            "--val",
            "0.2",
            "--test",
            "0.2",
            "--group-regex",
            r"(slide\d+)",
        ],
    )
    assert code == 0 and split.is_file() and "(group-level split)" in out and " groups" in out

    config = write_config(tmp_path / "cfg.yaml", data)
    run = tmp_path / "run"
    code, out, err = run_cli(
        [
            "train",
            str(config),
            "--out",
            str(run),
            "--set",
            f"data.split_csv={split}",
            "--set",
            "data.root=null",
            "--set",
            "trainer.max_epochs=2",
            "--no-progress",
        ],
    )
    assert code == 0, err
    assert "test split: accuracy" in out and (run / "reports" / "test" / "report.json").is_file()

    code, out, _ = run_cli(
        ["evaluate", str(run), "--data", str(data), "--out", str(tmp_path / "rep")],
    )
    assert code == 0 and "image-level: accuracy" in out
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["n"] == 6 * 12

    images = sorted((data / "lympho").iterdir())[:2]
    code, out, _ = run_cli(["predict", str(run), *map(str, images)])
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and len(lines) == 2
    assert {"file", "class", "probabilities", "confidence", "uncertain", "calibrated"} <= set(
        lines[0]
    )
    # Uncalibrated runs have no abstention threshold, so "uncertain" is unknown, not False.
    assert lines[0]["calibrated"] is False and lines[0]["uncertain"] is None
    assert abs(sum(lines[0]["probabilities"].values()) - 1) < 1e-3


def test_other_commands(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    synthetic_dir: Path,
    run_cli: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    code, out, _ = run_cli(["models", "list", "--filter", "resnet"])
    assert code == 0 and "resnet8" in out and "77," in out and "resnet50" in out
    code, out, _ = run_cli(["models", "list", "--filter", "efficientnet_b0", "--input-size", "224"])
    assert code == 0 and "efficientnet_b0" in out and "384.5" in out  # any exact timm name
    code, out, _ = run_cli(["models", "list", "--filter", "lite0"])
    assert "offline" in out and "tf_efficientnet_lite0" in out
    code, _, _ = run_cli(["models", "list", "--input-size", "8"])
    assert code != 0

    code, out, _ = run_cli(["data", "list"])
    assert "kather2016" in out

    tiles = sorted((synthetic_dir / "tumor").iterdir())[:2]
    target = sorted((synthetic_dir / "stroma").iterdir())[0]
    code, out, _ = run_cli(
        [
            "stain",
            "normalize",
            *map(str, tiles),
            "--target",
            str(target),
            "--out",
            str(tmp_path / "norm"),
            "--save-target",
            str(tmp_path / "t.json"),
        ],
    )
    assert code == 0 and sorted(p.name for p in (tmp_path / "norm").iterdir()) == sorted(
        [t.name for t in tiles] + ["preview.png"]
    )
    with Image.open(tmp_path / "norm" / "preview.png") as preview:  # before above, after below
        assert preview.size == (128 * len(tiles), 256)
    assert (tmp_path / "t.json").is_file()

    clash = tmp_path / "clash"
    clash.mkdir()
    Image.open(tiles[0]).save(clash / "preview.png")
    code, _, err = run_cli(
        [
            "stain",
            "normalize",
            str(clash / "preview.png"),
            "--target",
            str(target),
            "--out",
            str(clash),
        ]
    )
    assert code == 2 and "named preview.png" in err and "--preview 0" in err

    big = tmp_path / "big.png"
    Image.new("RGB", (100, 60), (150, 80, 170)).save(big)
    code, out, _ = run_cli(
        ["patches", str(big), "--size", "32", "--stride", "16", "--out", str(tmp_path / "patches")],
    )
    assert code == 0 and "wrote 10 patches" in out  # 2 rows x 5 cols
    assert (tmp_path / "patches" / "patches.csv").read_text().count("\n") == 11


def _folder(root: Path, classes: dict[str, int], mode: str = "RGB") -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new(mode, (32, 32), 120 if mode == "L" else (150, 80, 170)).save(
                root / name / f"{i}.png"
            )
    return root


@pytest.mark.parametrize(
    "case",
    [
        "corrupt",
        "empty",
        "single_class",
        "grayscale",
        "unknown_model",
        "malformed_yaml",
        "unknown_key",
        "missing_run",
        "bad_split_option",
    ],
)
def test_bad_input_gives_one_clear_error(
    case: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    run_cli: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    data = _folder(tmp_path / "data", {"a": 3, "b": 3})
    config = write_config(tmp_path / "cfg.yaml", data)
    args = ["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"]
    expected = ""
    if case == "corrupt":
        (data / "a" / "bad.png").write_bytes(b"garbage")
        expected = "bad.png"
    elif case == "empty":
        config = write_config(tmp_path / "cfg.yaml", _mkdir(tmp_path / "empty"))
        args[1], expected = str(config), "no class folders"
    elif case == "single_class":
        config = write_config(tmp_path / "cfg.yaml", _folder(tmp_path / "one", {"only": 3}))
        args[1], expected = str(config), "at least 2 classes"
    elif case == "grayscale":
        _folder(data, {"a": 1}, mode="L")
        expected = "grayscale"
    elif case == "unknown_model":
        args += ["--set", "model.name=resnet_8"]
        expected = "unknown model 'resnet_8'; did you mean resnet8"
    elif case == "malformed_yaml":
        config.write_text("data: {root: [\n")
        expected = "malformed YAML"
    elif case == "unknown_key":
        args += ["--set", "trainer.epochs=3"]
        expected = "trainer.epochs: unknown key"
    elif case == "missing_run":
        args = [
            "evaluate",
            str(tmp_path / "nope"),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "r"),
        ]
        expected = "not a histolite run"
    elif case == "bad_split_option":
        args = ["data", "split", str(data), "--out", str(tmp_path / "s.csv")]
        args += ["--val-split-by", "bogus"]
        expected = "val_split_by: Input should be 'same', 'group_if_possible' or 'stratified'"
    code, _, err = run_cli(args)
    assert code == 2
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_config_show_prints_the_resolved_recipe_and_refuses_bad_keys(
    run_cli: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    from support import REPO_ROOT

    from histolite.config import TrainConfig

    recipe = str(REPO_ROOT / "configs" / "kather2016_student_kd_crossfit.yaml")
    code, out, _ = run_cli(
        ["config", "show", recipe, "--set", "data.root=/data/kather", "--set", "seed=3"]
    )
    assert code == 0
    shown = TrainConfig.model_validate(yaml.safe_load(out))  # the output is a loadable config
    assert shown.seed == 3 and shown.data.root == "/data/kather"
    assert shown.distill is not None and shown.distill.crossfit_targets == "out_of_fold"
    assert "teacher_runtime: auto" in out  # defaults the recipe leaves out are filled in

    code, _, err = run_cli(["config", "show", recipe, "--set", "distill.temp=3"])
    assert code != 0 and "distill.temp: unknown key" in err

    code, out, _ = run_cli(["config", "reference"])
    assert code == 0 and out.startswith("# Config reference") and "`crossfit.folds`" in out


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (
            ["slide", "infer", "s.svs", "--model", "m", "--out", "o", "--batch-size", "0"],
            "--batch-size",
        ),
        (["slide", "features", "s.svs", "--out", "o", "--tile-px", "0"], "--tile-px"),
        (["slide", "tiles", "s.svs", "--tile-um", "0", "--out", "o"], "--tile-um"),
    ],
)
def test_out_of_range_slide_options_are_refused_before_any_work(
    args: list[str], option: str, run_cli: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    """A zero batch or tile size once crashed mid-batch with a bare ZeroDivisionError."""
    code, _, err = run_cli(args)
    assert code == 2
    assert f"Invalid value for '{option}'" in err and "greater than or equal" in err
    assert "Traceback" not in err
