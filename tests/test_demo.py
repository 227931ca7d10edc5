import json
from pathlib import Path

import pytest

from histolite.demo import run_demo

NAMES = ["teacher", "student", "student_kd", "student_multipart_kd"]


@pytest.mark.slow
def test_quick_demo_produces_the_table(tmp_path: Path) -> None:
    rows = run_demo(tmp_path / "demo", quick=True, progress=False)
    assert [r["name"] for r in rows] == NAMES
    assert all(r["parameters"] < 100_000 < rows[0]["parameters"] for r in rows[1:])
    assert all(r["macs"] < rows[0]["macs"] for r in rows[1:])
    # six synthetic tissue classes: even two quick epochs lift the teacher well above chance
    assert rows[0]["accuracy"] > 2 / 6
    for row in rows:
        report = json.loads(
            (tmp_path / "demo" / "compare" / "reports" / row["name"] / "report.json").read_text()
        )
        assert report["accuracy"] == row["accuracy"] and report["n"] == row["n"] == 24
        assert report["training_images_evaluated"] == 0  # the held-out slides only
        assert row["cpu_images_per_s_b64"] > 0 and row["onnx_int8_images_per_s_b64"] > 0
    table = (tmp_path / "demo" / "summary.md").read_text()
    assert "| student_multipart_kd | resnet8 |" in table and "ONNX INT8 img/s b64" in table
    switches = tmp_path / "demo" / "runs" / "student_multipart_kd" / "teacher_switches.json"
    assert [s["checkpoint"] for s in json.loads(switches.read_text())] == ["epoch_002.ckpt"]
