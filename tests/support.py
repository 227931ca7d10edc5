"""Helpers shared by the tests (plain functions; fixtures live in conftest.py files).

- configs: ``write_config`` writes a tiny CPU experiment;
- datasets: ``make_breakhis`` / ``make_idc`` / ``make_bach`` / ``make_nct`` / ``make_kather`` write
  tiny copies of public datasets' exact folder layouts and file names (random pixels);
- serving: ``train_small_run`` / ``export_small_model`` give a small exported model;
- real data: ``KATHER_DIR`` / ``kather_available`` for the developers' Kather tiles;
- live servers: ``running_uvicorn`` serves an app on a real socket in a thread.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import yaml
from PIL import Image

from histolite.data.registry import get_dataset
from histolite.slide.pyramid import write_pyramidal_tiff

REPO_ROOT = Path(__file__).resolve().parents[1]
KATHER_DIR = Path(os.environ.get("HISTOLITE_KATHER", REPO_ROOT.parent / "shared/data/kather2016"))


def kather_available() -> bool:
    return (KATHER_DIR / "01_TUMOR").is_dir()


def write_config(path: Path, data_root: Path, **sections: dict) -> Path:
    """A tiny CPU config on ``data_root``; ``sections`` update the defaults per section."""
    cfg: dict = {
        "seed": 0,
        "data": {
            "root": str(data_root),
            "image_size": 32,
            "batch_size": 16,
            "num_workers": 0,
            "val_fraction": 0.25,
        },
        "model": {"name": "resnet8"},
        "optimizer": {"name": "adam", "lr": 0.003},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "progress_bar": False},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.update(
            {key: value}
        )
    path.write_text(yaml.safe_dump(cfg))
    return path


# (tumour letter, subtype, patient, year) as they appear in BreakHis v1 file names.
BREAKHIS_PATIENTS = (
    ("B", "A", "22549AB", "14"),
    ("B", "F", "21998CD", "14"),
    ("B", "PT", "21998AB", "14"),
    ("B", "TA", "3411F", "14"),
    ("M", "DC", "2523", "14"),
    ("M", "LC", "13412", "14"),
    ("M", "DC", "13412", "14"),  # BreakHis files one patient under two subtypes
    ("M", "MC", "12773", "14"),
    ("M", "PC", "15704", "14"),
    ("B", "F", "14134", "14"),
    ("M", "DC", "4372", "14"),
    ("B", "A", "29960AB", "14"),
)
MAGNIFICATIONS = ("40", "100", "200", "400")
SUBTYPE_FOLDER = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}


def _png(path: Path, size: tuple[int, int], rng: np.random.Generator) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def make_breakhis(root: Path, images_per_magnification: int = 2, seed: int = 0) -> Path:
    """``BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/<patient>/<mag>X/``."""
    rng = np.random.default_rng(seed)
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    for tumour, subtype, patient, year in BREAKHIS_PATIENTS:
        kind = "benign" if tumour == "B" else "malignant"
        folder = (
            base
            / kind
            / "SOB"
            / SUBTYPE_FOLDER[subtype]
            / f"SOB_{tumour}_{subtype}_{year}-{patient}"
        )
        for mag in MAGNIFICATIONS:
            for seq in range(1, images_per_magnification + 1):
                name = f"SOB_{tumour}_{subtype}-{year}-{patient}-{mag}-{seq:03d}.png"
                _png(folder / f"{mag}X" / name, (23, 35), rng)
    return root


def make_idc(
    root: Path,
    patients: tuple[str, ...] = ("10253", "8863", "12868"),
    seed: int = 0,
    per_label: int = 3,
) -> Path:
    """``IDC_regular_ps50_idx5/<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<0|1>.png``."""
    rng = np.random.default_rng(seed)
    base = root / "IDC_regular_ps50_idx5"
    for patient in patients:
        for label in (0, 1):
            for k in range(per_label):
                x, y = 1001 + 50 * k, 51 + 100 * label
                name = f"{patient}_idx5_x{x}_y{y}_class{label}.png"
                _png(base / patient / str(label) / name, (50, 50), rng)
    return root


def make_bach(root: Path, photos_per_class: int = 2, seed: int = 0) -> Path:
    """``ICIAR2018_BACH_Challenge/Photos/<class>/<x>NNN.tif`` (+ the ground-truth CSV)."""
    rng = np.random.default_rng(seed)
    photos = root / "ICIAR2018_BACH_Challenge" / "Photos"
    prefix = {"Normal": "n", "Benign": "b", "InSitu": "is", "Invasive": "iv"}
    for name, p in prefix.items():
        (photos / name).mkdir(parents=True, exist_ok=True)
        for i in range(1, photos_per_class + 1):
            pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)  # 2048x1536 scaled down
            tifffile.imwrite(photos / name / f"{p}{i:03d}.tif", pixels)
    (photos / "microscopy_ground_truth.csv").write_text("b001.tif,Benign\n")
    return root


def make_nct(root: Path, name: str = "NCT-CRC-HE-100K", per_class: int = 2, seed: int = 0) -> Path:
    """``NCT-CRC-HE-100K/<CLASS>/<CLASS>-<ID>.tif`` with 9 classes."""
    rng = np.random.default_rng(seed)
    for cls in ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"):
        for i in range(per_class):
            folder = root / name / cls
            folder.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(
                folder / f"{cls}-AAAW{i:04d}.tif", rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
            )
    return root


KATHER_CLASSES = get_dataset("kather2016").classes


def make_kather(
    root: Path, images_per_class: int = 4, tiles_per_image: int = 3, seed: int = 0
) -> Path:
    """``<class>/<hex>_CRC-Prim-HE-<patient>_<image>.tif_Row_<r>_Col_<c>.tif``, as in the zip.

    Each class has ``images_per_class`` source images on two patients; 08_EMPTY has two source
    images, as in the real data.
    """
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(KATHER_CLASSES):
        images = 2 if cls == "08_EMPTY" else images_per_class
        for image in range(images):
            patient = 1 + image % 2
            for tile in range(tiles_per_image):
                name = (
                    f"{label:X}{image:02d}{tile:02d}_CRC-Prim-HE-{patient:02d}_"
                    f"{label}{image:02d}.tif_Row_{1 + 150 * tile}_Col_1.tif"
                )
                folder = root / cls
                folder.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(folder / name, rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    return root


def train_small_run(root: Path, data: Path, epochs: int = 4) -> Path:
    """4 epochs of ResNet-8 on the synthetic tiles, read as 0.5 um/px (16 um tiles)."""
    from histolite.train import resolve_config, train_run

    root.mkdir(parents=True, exist_ok=True)
    config = write_config(root / "cfg.yaml", data, data={"test_fraction": 0.25, "mpp": 0.5})
    cfg = resolve_config(config, [f"trainer.max_epochs={epochs}"], root / "run", resume=False)
    return train_run(cfg, root / "run", progress=False)


def export_small_model(root: Path, data: Path, *, int8: bool = False) -> Path:
    from histolite.export.onnx import export_run

    run = root / "run" if (root / "run" / "run.json").is_file() else train_small_run(root, data)
    out = root / ("model_int8" if int8 else "model")
    export_run(run, out, int8=int8, progress=False, parity_samples=32)
    return out


def mosaic_slide(
    path: Path, tiles: list[list[np.ndarray | None]], mpp: float, upsample: int = 2
) -> Path:
    """Tiles laid out in a grid (None = white glass), each upsampled ``upsample`` x at level 0.

    With ``upsample=2`` the pyramid's level 1 holds the original tiles pixel for pixel.
    """
    side = next(t for row in tiles for t in row if t is not None).shape[0]
    rows, cols = len(tiles), len(tiles[0])
    canvas = np.full((rows * side, cols * side, 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile is not None:
                canvas[r * side : (r + 1) * side, c * side : (c + 1) * side] = tile
    level0 = canvas.repeat(upsample, axis=0).repeat(upsample, axis=1)
    return write_pyramidal_tiff(path, level0, mpp / upsample, levels=2, tile=64)


@contextmanager
def running_uvicorn(app: Any, **config: Any) -> Iterator[tuple[str, Any]]:
    """Serve ``app`` with uvicorn in a thread; yields ``(base_url, server)``.

    The socket is bound here and handed to uvicorn, so no other process can take the port
    between choosing it and listening on it (xdist workers start servers at once). Start-up
    and shutdown are waited for and asserted: a server that never started fails here, not in
    the test's first request, and none keeps running into the next test.
    """
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config.setdefault("log_level", "warning")
    config.setdefault("timeout_graceful_shutdown", 1)  # open slow requests: cut, not awaited
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped before it started (see its log)"
            assert time.monotonic() < deadline, "uvicorn did not start within 60 s"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop within 30 s"
