"""Peak memory of one served prediction (decode + classify) against image size and format.

Each case runs in a fresh process: load the exported model, warm it up, note the peak resident
set size (RSS), then decode one upload and classify it as the service does
(``decode_rgb`` + ``OnnxClassifier.predict``) and note the peak again. The difference is what
one request of that size costs on top of a ready server; with the baseline it says which
``HISTOLITE_MAX_PIXELS`` fits a pod's memory limit.

    python benchmarks/decode_memory.py --model MODEL_DIR --megapixels 16 36 60
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

FORMATS = ("png-rgb8", "png-rgba8", "png-rgb16", "jpeg", "tiff-rgb8")


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def make_upload(fmt: str, megapixels: float) -> bytes:
    """A tissue-like smooth image (compresses fast, decodes to its full size)."""
    import tifffile
    from PIL import Image

    side = int((megapixels * 1e6) ** 0.5)
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    channels = [np.add.outer(ramp, ramp) / 2, ramp[None, :].repeat(side, 0), ramp[:, None]]
    base = np.stack(np.broadcast_arrays(*channels), -1)
    buffer = io.BytesIO()
    if fmt == "png-rgb16":
        import cv2  # Pillow cannot write 16-bit RGB PNG; OpenCV (histolite[train]) can

        ok, encoded = cv2.imencode(".png", (base * 65535).astype(np.uint16)[..., ::-1])
        assert ok
        return encoded.tobytes()
    pixels = (base * 255).astype(np.uint8)
    if fmt == "tiff-rgb8":
        tifffile.imwrite(buffer, pixels, compression="zlib")
    elif fmt == "png-rgba8":
        alpha = np.full((side, side, 1), 200, np.uint8)
        Image.fromarray(np.concatenate([pixels, alpha], -1)).save(buffer, "PNG", compress_level=1)
    elif fmt == "jpeg":
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def child(model_dir: str, upload: str, max_batch: int) -> None:
    from histolite.data.images import decode_rgb
    from histolite.runtime.classifier import OnnxClassifier

    model = OnnxClassifier(model_dir, threads=1, max_batch=max_batch)
    ready = _peak_mb()
    data = Path(upload).read_bytes()
    pixels = decode_rgb(data, upload, max_pixels=None)
    model.predict(pixels)
    torch_loaded = "torch" in sys.modules  # the serving path must not import it
    print(
        json.dumps(
            {
                "ready_mb": ready,
                "peak_mb": _peak_mb(),
                "upload_mb": len(data) / 1e6,
                "torch": torch_loaded,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an exported model folder")
    parser.add_argument("--megapixels", type=float, nargs="+", default=[16.0, 36.0, 60.0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--max-batch", type=int, default=16, help="patches per ONNX call")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.max_batch)
        return
    print(f"model {args.model}, max batch {args.max_batch}; peak RSS of a fresh process, MB")
    print("| format | Mpx | upload MB | ready | after one request | request cost |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for megapixels in args.megapixels:
            for fmt in args.formats:
                upload = Path(tmp) / f"{fmt}.bin"
                upload.write_bytes(make_upload(fmt, megapixels))
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--model",
                        args.model,
                        "--max-batch",
                        str(args.max_batch),
                        "--child",
                        args.model,
                        str(upload),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"| {fmt} | {megapixels:g} | {r['upload_mb']:.1f} | {r['ready_mb']:.0f} | "
                    f"{r['peak_mb']:.0f} | {r['peak_mb'] - r['ready_mb']:.0f} |",
                    flush=True,
                )
                upload.unlink()


if __name__ == "__main__":
    main()
