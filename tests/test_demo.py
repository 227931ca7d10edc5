from pathlib import Path

from histolite.demo import run_demo


def test_quick_demo_produces_the_table(tmp_path: Path) -> None:
    rows = run_demo(tmp_path / "demo", quick=True, progress=False)
    assert [r["name"] for r in rows] == ["teacher", "student", "student_kd", "student_multipart_kd"]
    assert all(r["parameters"] < 100_000 < rows[0]["parameters"] for r in rows[1:])
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["cpu_images_per_s_b64"] > 0 for r in rows)
    table = (tmp_path / "demo" / "summary.md").read_text()
    assert "| student_multipart_kd | resnet8 |" in table
    for name in ("teacher", "student", "student_kd", "student_multipart_kd"):
        assert (tmp_path / "demo" / "compare" / "reports" / name / "report.json").is_file()
    switches = tmp_path / "demo" / "runs" / "student_multipart_kd" / "teacher_switches.json"
    assert switches.is_file()
