"""The runtime and the whole slide pipeline import no torch: a serving-only install runs them."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import histolite.runtime
import histolite.slide


def _modules(package: object) -> list[str]:
    prefix = package.__name__ + "."  # type: ignore[attr-defined]
    return [m.name for m in pkgutil.iter_modules(package.__path__, prefix)]  # type: ignore[attr-defined]


def test_runtime_and_slide_modules_import_no_torch() -> None:
    modules = _modules(histolite.runtime) + _modules(histolite.slide)
    assert "histolite.slide.inference" in modules and "histolite.runtime.classifier" in modules
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'timm', 'lightning'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
