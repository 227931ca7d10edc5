"""The torch-free runtime: exported models (ONNX Runtime, NumPy, Pillow) as served.

Everything a serving-only install (``histolite[serve]``) runs lives here and in ``slide``;
nothing in this package imports torch, and a test guards it.
"""

from histolite.runtime.card import CARD_FILE, load_card
from histolite.runtime.classifier import OnnxClassifier, Prediction

__all__ = ["CARD_FILE", "OnnxClassifier", "Prediction", "load_card"]
