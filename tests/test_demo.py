from pathlib import Path

from histolite.demo import run_demo


def test_quick_demo_produces_the_table(tmp_path: Path) -> None:
    rows = run_demo(tmp_path / "demo", quick=True, progress=False)
    assert [r["model"] for r in rows] == ["teacher (resnet18)", "student (resnet8)"]
    assert rows[1]["parameters"] < 100_000 < rows[0]["parameters"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["cpu_images_per_s"] > 0 for r in rows)
    table = (tmp_path / "demo" / "summary.md").read_text()
    assert "student (resnet8)" in table
    for row in rows:
        assert (Path(row["report"]) / "report.json").is_file()
