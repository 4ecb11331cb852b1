"""Smoke test of the sampling benchmark's code path (tiny latent): its JSON has every field, and the
solver comparison on exact denoisers ranks the samplers as they must rank.  No timing is asserted."""

from __future__ import annotations

import json
import math

from bench import sampling  # the repository root is on sys.path under `python -m pytest` (make test)


def test_sampling_bench_record(tmp_path):
    rec = sampling.run("cpu", demo_dir=str(tmp_path / "no-demo"), latent_zyx=(4, 8, 8))
    json.dumps(rec)  # JSON-ready
    assert rec["method"] == "composed" and rec["latent_dvf"][1:] == [4, 8, 8]
    for label, steps in (("ddim_200", 200), ("dpmpp2m_20", 20)):
        s = rec["samplers"][label]
        assert s["steps"] == steps
        # measured times are reported, never compared: on a loaded machine any relation can flip
        assert all(isinstance(s[k], float) and math.isfinite(s[k]) for k in ("s_per_cycle", "s_per_phase"))
    assert rec["difference_trained_demo"].startswith("skipped: no trained model")
    mix = rec["difference_exact_denoisers"]["mixture_64_points_8d"]
    gauss = rec["difference_exact_denoisers"]["gaussian"]
    # 20 DPM-Solver++ steps land closer to 200-step DDIM than 20 DDIM steps do
    assert mix["dpmpp2m_20_vs_ddim_200_mean_abs"] < 0.5 * mix["ddim_20_vs_ddim_200_mean_abs"]
    assert gauss["dpmpp2m_20_vs_ddim_200_mean_abs"] < 0.5 * gauss["ddim_20_vs_ddim_200_mean_abs"]
    assert mix["dpmpp2m_20_same_point_fraction"] >= mix["ddim_20_same_point_fraction"]
