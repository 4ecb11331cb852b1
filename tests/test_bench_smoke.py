"""Smoke test of the sampling benchmark's code path (tiny latent): its JSON has every field, and the
solver comparison on exact denoisers ranks the samplers as they must rank.  No timing is asserted."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

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


def test_deepali_baseline_recovers_a_known_translation():
    """bench.registration_methods.run_deepali returns the pull field in mm, components (z, y, x): a moving image that is
    the fixed one shifted by t mm (moving(p) = fixed(p - t)) gives u = +t inside the image (tiny grid, anisotropic
    voxels so a swapped axis or voxel units would show)."""
    pytest.importorskip("deepali.spatial")
    import numpy as np
    import torch
    from scipy import ndimage

    from bench.registration_methods import DeepaliSettings, run_deepali
    from respmotion.core import Geometry

    shape, spacing = (24, 40, 40), (3.0, 1.5, 1.5)
    img = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=shape), (1.0, 2.0, 2.0))
    img = (img / img.std() * 300).astype(np.float32)
    t_mm = np.array([3.0, -2.0, 1.5])
    moving = ndimage.shift(img, t_mm / np.array(spacing), order=3, mode="nearest").astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a loaded machine wait on each other (docs/registration.md)
    try:
        u, _ = run_deepali(img, moving, Geometry(shape, spacing), "cpu", DeepaliSettings(max_steps=60))
    finally:
        torch.set_num_threads(threads)
    assert u.shape == (3, *shape)
    inner = u[:, 6:-6, 10:-10, 10:-10].reshape(3, -1)
    np.testing.assert_allclose(np.median(inner, axis=1), t_mm, atol=0.3)


def test_native_registration_cases_keep_world_landmarks_and_the_truth_in_mm(tmp_path, monkeypatch):
    """bench.registration --set native: the phantom pair resampled to a finer grid still carries its truth, so
    the resampled exact field moves the landmarks onto their targets as well as the original one does."""
    import numpy as np

    from bench import registration_cases as C
    from bench.registration_metrics import metrics

    monkeypatch.setenv("RESPMOTION_BENCH_CACHE", str(tmp_path))
    small = C.phantom_cases((16, 48, 48), 3, ("ref_50",))[0]
    big = C.native_cases((16, 48, 48), 3, ("ref_50",), native=(32, 96, 80))[0]
    assert big.fixed.shape == big.moving.shape == big.lung.shape == (32, 96, 80) and big.gt.shape == (3, 32, 96, 80)
    assert np.allclose(np.asarray(big.geom.spacing) * (32, 96, 80), np.asarray(small.geom.spacing) * (16, 48, 48))
    assert abs(big.lung.mean() - small.lung.mean()) < 0.02  # the same lungs, not shifted or scaled
    tre_small = metrics(small.gt, small)["landmark_error_mm"]
    tre_big = metrics(big.gt, big)["landmark_error_mm"]
    moved = metrics(np.zeros_like(big.gt), big)["landmark_error_mm"]
    assert moved > 1.0 and tre_big < 0.1 * moved and tre_big < tre_small + 0.2, (moved, tre_small, tre_big)


def test_registration_candidates_file_builds_every_candidate():
    """bench/registration_candidates.yaml: every candidate of each method is a valid settings object; ours'
    ``default`` is FFDSettings() itself and ``before_texture`` turns the texture weighting off."""
    from bench.registration_candidates import SETTINGS, load_candidates
    from respmotion.registration.config import FFDSettings

    for method, cls in SETTINGS.items():
        table = load_candidates(method)
        assert table and all(isinstance(s, cls) for s in table.values())
    ours = load_candidates("ours")
    assert ours["default"] == FFDSettings()
    assert ours["before_texture"].bending_texture == () and ours["before_texture"].texture_air_hu is None
    for s in ours.values():
        s.check()


def test_deepali_anchor_is_loaded_from_its_path(tmp_path):
    """The bench's ``deepali`` method calls ``register_deepali(fixed, moving, spacing)`` of the anchor file, loaded
    from its path; a missing file is one clear error."""
    import numpy as np
    import pytest

    from bench.registration_methods import load_anchor

    anchor = tmp_path / "deepali_ffd.py"
    anchor.write_text("import numpy as np\n\ndef register_deepali(fixed, moving, spacing):\n"
                      "    return np.full((3, *fixed.shape), float(spacing[0]), np.float32)\n")
    u = load_anchor(anchor)(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), (3.0, 1.5, 1.5))
    assert u.shape == (3, 2, 3, 4) and float(u[0, 0, 0, 0]) == 3.0
    with pytest.raises(FileNotFoundError, match="deepali-example"):
        load_anchor(tmp_path / "missing.py")


def test_demo_bench_summarises_a_demo_folder_and_its_checks(tmp_path):
    """bench.demo reads a demo folder's summary and checks the model against the population-mean field."""
    from bench import demo as bench_demo

    phases = ["10", "50", "90"]
    table = {"model, one sample": dict(zip(phases, [0.5, 1.5, 0.6])),
             "model, mean of K samples": dict(zip(phases, [0.4, 1.2, 0.9])),
             "population-mean field": dict(zip(phases, [0.5, 2.0, 0.8]))}
    head = {"model/dvf_error_lung_mean_mm": 0.867, "model_mean/dvf_error_lung_mean_mm": 0.833,
            "model/energy_score_mm": 0.7, "population_mean/dvf_error_lung_mean_mm": 1.1}
    (tmp_path / "demo_summary.json").write_text(json.dumps(
        {"headline": head, "generator_per_phase": table, "seconds": {"phantom": 10.0, "diffusion": 30.5}}))
    (tmp_path / "demo_config.yaml").write_text("seed: 3\npatients: 48\nthreads: 2\n")
    rec = bench_demo.summarise(tmp_path)
    assert rec["seed"] == 3 and rec["pipeline_s"] == 40.5
    assert rec["checks"] == {"mean_vs_population": round(0.833 / 1.1, 3), "every_phase": False,  # 0.9 > 0.8 at 90
                             "energy_vs_population": round(0.7 / 1.1, 3), "single_below_population": True}
    over = bench_demo.spread([rec, {**rec, "pipeline_s": 50.5}])
    assert over["pipeline_s"] == {"mean": 45.5, "min": 40.5, "max": 50.5}


def test_synthesis_bench_precision_check(tmp_path):
    """``bench.synthesis --variant ldm --precision bf16`` records the networks' precision and the field difference to
    fp32 from the same noise: not zero (bf16 ran), a few percent at most on a tiny grid."""
    from bench.synthesis import run

    rec = run(shape=(8, 32, 32), variant="ldm", quick=True, steps=2, precision="bf16", cache_dir=str(tmp_path))
    check = rec["precision_check"]
    assert rec["motion"].endswith("networks in bf16") and check["phases"] == [10, 50]
    assert 0 < check["rel_diff"] < 0.2, check


def test_heldout_draws_scores_a_cohort_with_a_known_answer():
    """Every patient's cycle is its amplitude times one shared cycle: the amplitude oracle is exact (error 0), the
    population mean is not, and the regressed prior reading a feature that is the amplitude beats the mean field."""
    from bench.heldout_draws import score_split

    rng = np.random.default_rng(0)
    patients, shape = 26, (2, 4, 4)
    amp = rng.uniform(0.5, 1.5, patients)
    cycle = np.sin(np.pi * np.arange(1, 10) / 10.0)[:, None, None, None, None] * rng.normal(size=(1, 3, *shape))
    fields = (amp[:, None, None, None, None, None] * cycle[None]).astype(np.float32)
    lungs = np.ones((patients, 9, *shape), bool)
    feats = np.c_[amp, rng.normal(size=(patients, 2))]
    keys = [f"p{i}" for i in range(patients)]
    err = score_split(np.arange(20), np.arange(20, 26), keys, fields, lungs, feats)
    assert set(err) == {"population mean", "amplitude oracle", "regressed prior"}
    assert np.all(err["amplitude oracle"] < 1e-5) and np.all(err["population mean"] > 0.05)
    assert np.all(err["regressed prior"] < err["population mean"])


def test_heldout_draws_refuses_zero_draws(tmp_path, capsys):
    from bench.heldout_draws import main

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--draws", "0"])
    assert exc.value.code == 2 and "--draws must be at least 1" in capsys.readouterr().err
