"""The evaluation report: JSON round trip, one-page PNG of the expected size, self-contained HTML."""

import json

import numpy as np
from matplotlib.image import imread

from respmotion.evaluation.report import SUMMARY_SIZE_PX, write_report


def _report():
    phases = [str(p) for p in range(0, 100, 10)]
    curve = {p: float(np.sin(int(p) / 100 * np.pi) * 8) for p in phases}
    stats = {"n": 41, "mean": 2.0, "sd": 1.0, "median": 1.9, "p95": 4.0, "max": 5.0}
    return {
        "title": "test <report>",
        "headline": {"landmark error 50% (mm)": 2.25, "folding %": 0.0, "model": "phantom & co"},
        "breathing_curve": {"generated": curve, "ground truth": {p: v * 1.1 for p, v in curve.items()}},
        "dvf_error_per_phase": {"generated": {p: {"mean": 1.0, "p95": 2.5} for p in phases}},
        "landmarks": {
            "units": "mm",
            "direction": "move",
            "phases": {p: {"no_motion": {"all": stats}, "field": {"all": dict(stats, mean=1.0)}} for p in phases},
        },
        "extra": {"nested": [1, 2, 3]},
    }


def test_write_report_files(tmp_path):
    rep = _report()
    paths = write_report(tmp_path / "eval", rep)
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"report.json", "summary.png", "summary.html"}
    assert json.loads(paths["json"].read_text()) == rep
    img = imread(paths["png"])
    assert img.shape[:2] == (SUMMARY_SIZE_PX[1], SUMMARY_SIZE_PX[0])
    page = paths["html"].read_text()
    assert "data:image/png;base64," in page
    assert "test &lt;report&gt;" in page and "phantom &amp; co" in page and "2.25" in page


def test_report_json_sanitised(tmp_path):
    rep = {"headline": {"psnr": float("inf"), "n": np.int64(3)}, "breathing_curve": {"gen": {np.int64(50): np.float32(1.5)}}}
    back = json.loads(write_report(tmp_path, rep)["json"].read_text())
    assert back == {"headline": {"psnr": None, "n": 3}, "breathing_curve": {"gen": {"50": 1.5}}}
    assert imread(tmp_path / "summary.png").shape[:2] == (SUMMARY_SIZE_PX[1], SUMMARY_SIZE_PX[0])
