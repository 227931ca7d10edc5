"""Evaluation: metrics, reports, figures, Grad-CAM and attention maps.

Import the module you need (``histolite.evaluate.report`` for ``evaluate_run``). This
``__init__`` imports nothing, so the torch-free metrics and plots (``metrics``, ``plots``) can be
used where torch is not installed, e.g. by ``histolite slide evaluate``.
"""
