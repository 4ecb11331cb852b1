"""The measured motion reference (DIR-Lab landmarks) and the population model shipped with the package."""

from __future__ import annotations

import numpy as np
import pytest

from respmotion.data import motion_reference as MR
from respmotion.data import motion_reference_fit as MRF


def test_packaged_reference_is_the_one_make_builds(shared_data):
    """The JSON inside the package equals what ``make motion-reference`` computes from the data now."""
    built = MRF.build_reference(shared_data / "dirlab-4dct-landmarks")
    shipped = MR.load_reference()
    np.testing.assert_allclose(built["spatial_model"]["coef"], shipped["spatial_model"]["coef"], atol=1e-9)
    assert built["phase_curve"]["n"] == shipped["phase_curve"]["n"]
    assert built["amplitude"]["per_case"] == pytest.approx(shipped["amplitude"]["per_case"])


def test_leave_one_case_out_beats_zero_motion_by_40_percent_given_the_amplitude():
    for row in MR.load_reference()["leave_one_out"]:
        assert row["with_amplitude_gain"] >= 0.40, row
        assert row["with_amplitude_mm"] < row["zero_motion_mm"]


def test_amplitudes_match_the_published_dirlab_means():
    amp = MR.load_reference()["amplitude"]
    # mean |displacement| of the 300 pairs, as published by DIR-Lab (shared/data README table)
    published = {"1": 3.89, "2": 4.34, "3": 6.94, "4": 9.83, "5": 7.48, "6": 10.89, "7": 11.03, "8": 14.99, "9": 7.92}
    for c, v in published.items():
        assert amp["magnitude_mean_per_case_mm"][c] == pytest.approx(v, abs=0.01)
        assert 0.8 * v < amp["per_case"][c] <= v  # mostly superior-inferior


def test_spatial_model_moves_the_posterior_base_most():
    model = MR.load_reference()["spatial_model"]
    apex_ant = MR.spatial_unit(model, np.array([[0.1, 0.2, 0.5]]))[0]
    base_post = MR.spatial_unit(model, np.array([[0.9, 0.8, 0.5]]))[0]
    assert base_post[0] > 1.5 and abs(apex_ant[0]) < 0.3  # superior motion per mm of amplitude


def test_phase_curve_is_zero_at_inhale_one_at_the_peak_and_loops():
    pc = MR.load_reference()["phase_curve"]
    s, h = MR.phase_state(np.array([0.0, 100.0 * pc["peak"], 100.0]), pc["n"], pc["peak"], 0.3)
    np.testing.assert_allclose(s, [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(h, [0, 1, 0], atol=1e-12)
    # hysteresis: at the same SI state the AP/LR state differs between exhale and inhale
    sa, ha = MR.phase_state(20.0, 2.0, 0.5, 0.3)
    sb, hb = MR.phase_state(80.0, 2.0, 0.5, 0.3)
    assert sa == pytest.approx(sb) and ha > hb
    # asymmetric: a later peak makes the inhale branch steeper than the exhale branch
    early, late = MR.phase_state(np.array([10.0, 90.0]), 2.0, 0.6)[0]
    assert early < late
    # the fitted exhale half follows DIR-Lab's measured mean state within 0.1
    model = MR.phase_state(np.asarray(pc["phases"], float), pc["n"], pc["peak"])[0]
    np.testing.assert_allclose(model / model[-1], pc["superior_state_mean"], atol=0.1)


def test_missing_data_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "ref.json"
    assert MRF.main(["--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and not out.exists()
