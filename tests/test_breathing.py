"""Amplitude and breathing-trace control by stationary velocity fields on a phantom patient."""

from __future__ import annotations

import numpy as np
import pytest

from respmotion.anatomy.measures import diaphragm_excursion
from respmotion.core.ops import jacobian_determinant
from respmotion.core.types import DisplacementField, Volume
from respmotion.data.phantom import BreathingCurve, make_patient
from respmotion.synthesis.breathing import (
    TraceError, amplitude_for_excursion, amplitude_for_superior_mean, check_trace, find_extrema, iter_trace_sequence,
    read_trace, scale_motion, superior_mean, velocity_fields,
)

SHAPE = (16, 64, 64)
PHASES = (0, 20, 50, 70)  # a subset keeps the test fast: both branches and end-exhale


@pytest.fixture(scope="module")
def model():
    # a patient of moderate amplitude (lung mean 5.1 mm superior at 50 %; DIR-Lab median 6.7): at this coarse
    # grid (9.4 x 5.6 mm voxels) the log/exp round trip of the largest DIR-Lab-like breaths (12 mm) errs ~0.4 mm
    ph = make_patient(3, SHAPE, noise_hu=0.0)
    g = ph.geometry
    unit = ph.unit_field()
    fields = {k: DisplacementField((float(BreathingCurve.population().states(k)[0]) * unit).astype(np.float32), g) for k in PHASES}
    lung = Volume(ph.phase(0)["lung"], g)
    return fields, velocity_fields(fields), lung


def _folding_percent(f: DisplacementField) -> float:
    return 100.0 * float((jacobian_determinant(f) <= 0).mean())


def test_amplitude_factors(model):
    fields, vel, lung = model
    e_model = diaphragm_excursion(lung, fields[50])["mean_mm"]
    exc = {}
    for a in (0.0, 1.0, 2.0):
        f = scale_motion({50: fields[50]}, a, velocities=vel)[50]
        exc[a] = diaphragm_excursion(lung, f)["mean_mm"]
        assert _folding_percent(f) == 0.0
        if a == 0.0:
            assert np.abs(f.array).max() == 0.0
        if a == 1.0:
            # log/exp round trip: mean error < 0.15 mm in the lung, < 1.5 mm anywhere (the worst is at the
            # phantom's 2-mm-wide sliding interface, narrower than one 5.6-mm voxel at this size)
            err = np.linalg.norm(f.array - fields[50].array, axis=0)
            print(f"factor 1 vs model field: lung mean {err[lung.array != 0].mean():.3f} mm, "
                  f"p99 {np.percentile(err, 99):.3f} mm, max {err.max():.3f} mm")
            assert err[lung.array != 0].mean() < 0.15 and err.max() < 1.5
    print(f"diaphragm excursion mm: model {e_model:.2f}, "
          f"factor 0/1/2: {exc[0.0]:.2f} / {exc[1.0]:.2f} / {exc[2.0]:.2f}")
    assert exc[0.0] == pytest.approx(0.0, abs=1e-9)
    assert exc[1.0] == pytest.approx(e_model, abs=0.3)
    assert exc[2.0] == pytest.approx(2.0 * e_model, rel=0.1)
    target = round(0.8 * e_model, 1)
    a = amplitude_for_excursion(fields, lung, target, velocities=vel)
    got = diaphragm_excursion(lung, scale_motion({50: fields[50]}, a, velocities=vel)[50])["mean_mm"]
    assert got == pytest.approx(target, abs=0.1) and 0 < a < 1
    with pytest.raises(ValueError, match=">= 0"):
        scale_motion(fields, -1.0, velocities=vel)
    # the amplitude as a user gives it: the lung's mean superior motion at 50 % (e.g. from landmarks)
    up = superior_mean(fields[50], lung)
    a = amplitude_for_superior_mean(fields, lung, round(0.6 * up, 1), velocities=vel)
    assert superior_mean(scale_motion({50: fields[50]}, a, velocities=vel)[50], lung) == pytest.approx(
        round(0.6 * up, 1), abs=0.05)
    assert 0.5 < a < 0.7 and up > 3.0


def _write_trace(path, t, amp, header="time_s,amplitude"):
    path.write_text(header + "\n" + "".join(f"{a:.4f},{b:.5f}\n" for a, b in zip(t, amp)))
    return path


def test_trace_with_two_cycles_of_different_depth(model, tmp_path):
    fields, vel, lung = model
    e_model = diaphragm_excursion(lung, fields[50])["mean_mm"]
    t = np.arange(0.0, 8.0001, 0.5)
    # inhale peaks at 1.0 (t = 0, 4, 8); exhale troughs at 0.0 (t = 2, full breath) and 0.5 (t = 6, half breath)
    depth = np.where(t <= 4.0, 1.0, 0.5)
    amp = 1.0 - depth * (1.0 - np.cos(2 * np.pi * t / 4.0)) / 2.0
    amp += np.random.default_rng(0).normal(0, 0.01, t.shape)  # monitor noise
    trace = check_trace(_write_trace(tmp_path / "trace.csv", t, amp))
    seq = list(iter_trace_sequence(fields, trace, velocities=vel, model_depth=1.0))
    assert [s[0] for s in seq] == pytest.approx(t.tolist())
    exc = np.array([diaphragm_excursion(lung, f)["mean_mm"] for _, f in seq])
    c1, c2 = exc[t < 4.0].max(), exc[t >= 4.0].max()
    print(f"trace excursions mm per sample: {np.round(exc, 2).tolist()}; cycle 1 max {c1:.2f}, cycle 2 max {c2:.2f}, "
          f"model {e_model:.2f}")
    assert c1 == pytest.approx(e_model, rel=0.1)
    assert c2 == pytest.approx(0.5 * e_model, rel=0.15)
    assert abs(exc[0]) < 0.5 and abs(exc[8]) < 0.5  # end-inhale = the reference
    assert seq[3][1].meta["branch"] == "exhale" and seq[5][1].meta["branch"] == "inhale"
    assert all(_folding_percent(f) == 0.0 for _, f in seq[::4])
    # no jump between consecutive samples bigger than the largest per-sample change of the model cycle
    assert np.max(np.abs(np.diff(exc))) < 0.5 * e_model


def test_extrema_and_bad_csv(tmp_path):
    a = np.array([0, 1, 0.95, 1.02, 0.3, 0.0, 0.05, 0.8, 1.0, 0.2])
    # the start counts as a trough (the signal rose from it); the 0.95 wiggle is below the hysteresis
    assert find_extrema(a, 0.15) == [(0, "trough"), (3, "peak"), (5, "trough"), (8, "peak")]
    p = tmp_path / "bad.csv"
    p.write_text("time,amplitude\n0,1\n0.5,x\n1,0\n")
    with pytest.raises(TraceError, match=r"bad\.csv:3: not a number"):
        read_trace(p)
    p.write_text("# monitor export\n0,1\n0.5,0.5\n0.5,0\n")
    with pytest.raises(TraceError, match=r"bad\.csv:4: time 0\.5 does not increase"):
        read_trace(p)
    p.write_text("0;1\n")
    with pytest.raises(TraceError, match=r"bad\.csv:1: expected 'time, amplitude'"):
        read_trace(p)
    p.write_text("0,1\n1,1\n2,1\n")
    with pytest.raises(TraceError, match=r"bad\.csv: no full breath"):
        check_trace(p)
