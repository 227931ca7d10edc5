"""A model repository: several exported models, each in several versions, served at once.

Layout (as TF Serving and Triton lay theirs out)::

    MODELS/<name>/<version>/model.onnx + model.json

The newest version of each name is its default (versions compare as numbers where they are
numbers: 10 is newer than 9). A folder whose name is not a safe identifier, or whose model does
not load, is reported and skipped; the others are served. A folder that is itself an exported
model (``model.json`` directly inside) is a repository of that one model, so
``histolite serve MODEL_DIR`` keeps working.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from histolite.errors import HistoliteError
from histolite.runtime.card import CARD_FILE
from histolite.runtime.classifier import OnnxClassifier

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def shown(text: object, limit: int = 64) -> str:
    """``repr`` of a client's value, cut to ``limit`` characters: errors never echo unbounded
    input (a 70 KB model name came back whole in a 404)."""
    value = repr(text)
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"


def is_safe_name(text: str) -> bool:
    """Letters, digits, dot, dash, underscore; no path separators, no leading dot."""
    return bool(SAFE_NAME.match(text)) and ".." not in text


def version_key(version: str) -> tuple[Any, ...]:
    """Natural order: ``2 < 10``, ``1.9 < 1.10``; numbers before words at each position."""
    parts = re.split(r"[.\-_]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


@dataclass
class ModelEntry:
    name: str
    version: str
    path: Path
    model: OnnxClassifier

    @property
    def card(self) -> dict[str, Any]:
        return self.model.card

    def public_card(self) -> dict[str, Any]:
        """The model card without paths of the machine it was exported on (the run folder;
        the stain target file, kept by its name)."""
        card = {k: v for k, v in self.card.items() if k != "source_run"}
        stain = card.get("stain")
        if isinstance(stain, dict) and isinstance(stain.get("source"), str):
            card["stain"] = {**stain, "source": PurePath(stain["source"]).name}
        return card


@dataclass
class Repository:
    """Loaded models by name and version, plus the folders that could not be loaded."""

    root: Path
    models: dict[str, dict[str, ModelEntry]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.models)

    def default_version(self, name: str) -> str:
        return max(self.models[name], key=version_key)

    def get(self, name: str | None = None, version: str | None = None) -> ModelEntry:
        """A model by name (default: the only one, else the first by name) and version."""
        if name is None:
            if not self.models:
                raise KeyError("no models are loaded")
            name = self.names()[0]
        if name not in self.models:
            raise KeyError(
                f"unknown model {shown(name)}; models: {', '.join(self.names()) or 'none'}"
            )
        versions = self.models[name]
        chosen = version if version is not None else self.default_version(name)
        if chosen not in versions:
            known = ", ".join(sorted(versions, key=version_key))
            raise KeyError(f"model {name!r} has no version {shown(chosen)}; versions: {known}")
        return versions[chosen]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "default_version": self.default_version(name),
                "versions": [
                    {"version": v, "card": self.models[name][v].public_card()}
                    for v in sorted(self.models[name], key=version_key, reverse=True)
                ],
            }
            for name in self.names()
        ]


def _load(path: Path, threads: int | None) -> OnnxClassifier:
    try:
        return OnnxClassifier(path, threads=threads)
    except HistoliteError:
        raise
    except Exception as exc:  # ONNX Runtime raises its own types for corrupt graphs
        raise HistoliteError(
            f"{path}: cannot load the model ({type(exc).__name__}: {exc})"
        ) from exc


def _relative(text: str, root: Path) -> str:
    """A load error with the repository's own path cut, so that ``/v1/models`` names folders
    as ``name/version/...`` and never shows where the server keeps its files."""
    for base in sorted({str(root), str(root.resolve())}, key=len, reverse=True):
        text = text.replace(base + os.sep, "")
    return text


def load_repository(root: str | Path, threads: int | None = None) -> Repository:
    """Every servable model under ``root``; broken folders are recorded, not fatal."""
    root = Path(root)
    if not root.is_dir():
        raise HistoliteError(f"{root}: model folder or repository not found")
    repo = Repository(root)
    if (root / CARD_FILE).is_file():  # one exported model: a repository of one
        model = _load(root, threads)
        name = str(model.card.get("name") or root.name)
        version = str(model.card.get("version") or "1")
        name = name if is_safe_name(name) else "model"
        version = version if is_safe_name(version) else "1"
        repo.models[name] = {version: ModelEntry(name, version, root, model)}
        return repo
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if not is_safe_name(name_dir.name):
            repo.broken[name_dir.name] = "not a safe model name (letters, digits, . _ - only)"
            continue
        for version_dir in sorted(p for p in name_dir.iterdir() if p.is_dir()):
            key = f"{name_dir.name}/{version_dir.name}"
            if not is_safe_name(version_dir.name):
                repo.broken[key] = "not a safe version name (letters, digits, . _ - only)"
                continue
            try:
                model = _load(version_dir, threads)
            except HistoliteError as exc:
                repo.broken[key] = _relative(str(exc), root)
                continue
            entry = ModelEntry(name_dir.name, version_dir.name, version_dir, model)
            repo.models.setdefault(name_dir.name, {})[version_dir.name] = entry
    if not repo.models:
        details = "; ".join(f"{k}: {v}" for k, v in repo.broken.items())
        raise HistoliteError(
            f"{root}: no servable model; expected <name>/<version>/model.json"
            + (f" ({details})" if details else "")
        )
    return repo
