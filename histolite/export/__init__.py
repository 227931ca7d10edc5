"""Export a trained run to ONNX (FP32 or INT8) with parity checks, and compare runs.

Needs torch. What runs the exported graphs without torch is ``histolite.runtime``.
"""
