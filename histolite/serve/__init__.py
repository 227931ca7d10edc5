"""FastAPI service on ONNX Runtime: prediction API, upload page, metrics, audit log.

Nothing here imports torch: a serving image needs ONNX Runtime, NumPy, Pillow and FastAPI only.
"""
