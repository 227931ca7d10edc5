"""The exported model folder: its file names, its card, and checks that the graphs are the
ones the card describes. The card is the contract between export and everything that serves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from histolite.errors import HistoliteError
from histolite.fileio import file_sha256

MODEL_FILE = "model.onnx"
STAIN_FILE = "stain.onnx"
MIL_HEAD_FILE = "mil_head.onnx"  # bag models: pooling + classifier over the whole bag
CARD_FILE = "model.json"
# 3: bag models are two graphs, patches -> (embeddings, scores) in chunks, then mil_head.onnx
# 2: Reinhard lives in stain.onnx, applied before the resize (1: inside model.onnx, or none)
CARD_FORMAT_VERSION = 3


def load_card(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise HistoliteError(
            f"{model_dir}: not an exported model (no {CARD_FILE}); run "
            "`histolite export RUN --out MODEL_DIR` first"
        )
    try:
        card: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HistoliteError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("classes", "input_size", "patch_size", "patch_stride"):
        if key not in card:
            raise HistoliteError(f"{path}: model card lacks {key!r}")
    made_by = card.get("format_version", 1)
    if not isinstance(made_by, int) or made_by > CARD_FORMAT_VERSION:
        raise HistoliteError(
            f"{path}: model card format {made_by!r} is newer than this histolite understands "
            f"(up to {CARD_FORMAT_VERSION}); upgrade histolite to serve this export"
        )
    return card


def verify_graphs(model_dir: Path, card: dict[str, Any], *, hashes: bool = True) -> None:
    """The folder's graphs (``model.onnx``, and ``stain.onnx`` when the card names one) exist
    and, with ``hashes``, are the ones the card describes: a swapped or damaged file is refused.
    """
    graphs = [(MODEL_FILE, card.get("sha256"))]
    if card.get("stain_graph") is not None:  # a fixed name: the card names no paths
        graphs.append((STAIN_FILE, card["stain_graph"].get("sha256")))
    if card.get("mil_head") is not None:
        graphs.append((MIL_HEAD_FILE, card["mil_head"].get("sha256")))
    for name, expected in graphs:
        path = model_dir / name
        if not path.is_file():
            raise HistoliteError(f"{path}: model file missing")
        if hashes and expected is not None and file_sha256(path) != expected:
            raise HistoliteError(
                f"{path}: the graph is not the one its model card describes (SHA-256 differs "
                "from model.json); refusing to use a swapped or damaged model"
            )


# What names a model's outputs: name and version alone are not enough, since re-exporting a
# retrained run to the same folder keeps both and only the graphs' hashes tell them apart.
IDENTITY_KEYS = ("model", "model_version", "model_sha256", "stain_sha256")


def card_identity(card: dict[str, Any]) -> dict[str, Any]:
    """Name, version and graph hashes of a model card, as slide summaries and markers record."""
    stain_sha256 = (card.get("stain_graph") or {}).get("sha256")
    values = (card.get("name"), card.get("version"), card.get("sha256"), stain_sha256)
    return dict(zip(IDENTITY_KEYS, values, strict=True))


def exported_model_identity(model_dir: Path) -> dict[str, Any]:
    """:func:`card_identity` of an exported model folder, without loading its graphs.

    The graphs are hashed and compared with the card, as loading the model would, so a folder
    whose files were replaced without their card is refused rather than trusted.
    """
    card = load_card(model_dir)
    verify_graphs(Path(model_dir), card)
    return card_identity(card)


def describe_identity(identity: dict[str, Any] | tuple[Any, ...]) -> str:
    """One line naming a model identity, for error messages."""
    values = tuple(identity.values()) if isinstance(identity, dict) else identity
    name, version, sha256, _ = values
    if not any(values):
        return "no recorded model (an older histolite)"
    return f"{name} {version} (model.onnx sha256 {str(sha256)[:12] if sha256 else 'unknown'})"


def require_current_calibration(model_dir: Path, card: dict[str, Any]) -> None:
    """Refuse an export whose run was calibrated after it was exported.

    The card records which weights it holds (``checkpoint_sha256``) and which calibration it
    carries (``calibration.file_sha256``). If the run folder is on this machine and its
    ``calibration.json`` now fits those very weights but is not the one exported, the export
    would serve uncalibrated (or stale) probabilities: re-export instead. Runs elsewhere (a
    container with only the export) cannot be checked; the card's own calibration stands.
    """
    run = card.get("source_run")
    weights = card.get("checkpoint_sha256")
    if not run or not weights:
        return
    path = Path(run) / "calibration.json"
    if not path.is_file():
        return
    exported = (card.get("calibration") or {}).get("file_sha256")
    if file_sha256(path) == exported:
        return
    try:
        fitted_for = json.loads(path.read_text(encoding="utf-8")).get("checkpoint_sha256")
    except (OSError, json.JSONDecodeError):
        return  # not this folder's problem: the run's own commands report a broken file
    if fitted_for == weights:
        raise HistoliteError(
            f"{model_dir}: its run {run} was calibrated after this export ({path} is not the "
            "calibration the card carries), so it would serve uncalibrated probabilities; "
            f"re-export it: histolite export {run} --out NEW_FOLDER"
        )
