"""Export a trained run to ONNX (FP32 or INT8), and the torch-free runtime that serves it.

Import ``histolite.export.onnx`` (needs torch) or ``histolite.export.runtime`` (ONNX Runtime and
NumPy only) directly: this package's ``__init__`` imports neither, so serving never loads torch.
"""
