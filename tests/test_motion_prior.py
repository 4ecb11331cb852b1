"""The regressed motion prior (respmotion.models.prior): known slopes recovered, ridge chosen by leave-one-out,
clipping, residual/restore and its files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from respmotion.models.prior import FEATURE_LIMIT, RIDGE_GRID, MotionPrior

SHAPE = (3, 2, 3, 4)  # (components, z, y, x)
IDS = ("ref_10", "ref_50")


def _cohort(n: int, slope_scale: float, noise: float, seed: int = 0):
    """``n`` patients with 3 raw features; field = base + sum_j z_j W_j + noise, per id (W of ref_10 a fifth)."""
    rng = np.random.default_rng(seed)
    raw = rng.normal([3000.0, 120.0, 200.0], [400.0, 10.0, 15.0], size=(n, 3))
    z = (raw - raw.mean(0)) / np.maximum(raw.std(0), 1e-9)
    base = {fid: rng.normal(0, 3, SHAPE) for fid in IDS}
    slopes = {fid: slope_scale * (0.2 if fid == "ref_10" else 1.0) * rng.normal(0, 1, (3, *SHAPE)) for fid in IDS}
    items = [(fid, base[fid] + np.tensordot(z[i], slopes[fid], 1) + noise * rng.normal(0, 1, SHAPE), f"p{i}")
             for i in range(n) for fid in IDS]
    return items, {f"p{i}": raw[i] for i in range(n)}, base, slopes


def test_regressed_prior_recovers_known_slopes_and_round_trips(tmp_path):
    items, feats, base, slopes = _cohort(40, 1.0, 0.05)
    prior = MotionPrior.from_fields(lambda: iter(items), {"patients": list(feats)}, "regressed", feats,
                                    ("a", "b", "c"))
    assert prior.needs_features and prior.mode == "regressed"
    assert prior.meta["regression"]["ridge"] <= 1.0  # strong signal: little shrinkage
    for fid in IDS:
        i = prior.ids.index(fid)
        assert np.allclose(prior.slopes[i], slopes[fid], atol=0.05)
        assert np.allclose(prior.fields[i], base[fid], atol=0.05)
    fid, u, key = items[7]
    r = prior.residual(fid, u, feats[key])
    assert np.abs(r).max() < 0.5  # the residual of a training item is its noise over the id's scale
    back = prior.restore([fid], torch.from_numpy(r)[None], feats[key])[0].numpy()
    assert np.allclose(back, u, atol=1e-4)
    with pytest.raises(ValueError, match="lung features"):
        prior.field(fid)
    npy = prior.save(tmp_path / "p")
    again = MotionPrior.load(npy, sha256=prior.record()["sha256"])
    assert again.mode == "regressed" and prior.record()["mode"] == "regressed"
    assert np.array_equal(again.slopes, prior.slopes) and np.array_equal(again.fields, prior.fields)
    assert np.allclose(again.field(fid, feats[key]), prior.field(fid, feats[key]))


def test_features_beyond_three_sd_are_clipped():
    items, feats, _, _ = _cohort(40, 1.0, 0.05)
    prior = MotionPrior.from_fields(items, {}, "regressed", feats)
    mean, std = prior.feature_mean, prior.feature_std
    edge = prior.field("ref_50", mean + FEATURE_LIMIT * std)
    assert np.allclose(prior.field("ref_50", mean + 10 * std), edge)
    assert not np.allclose(prior.field("ref_50", mean), edge)


def test_noise_features_shrink_to_the_mean_field():
    items, feats, _, _ = _cohort(40, 0.0, 1.0)  # the fields do not depend on the features
    prior = MotionPrior.from_fields(items, {}, "regressed", feats)
    loo = prior.meta["regression"]["leave_one_out_rms_mm"]
    assert prior.meta["regression"]["ridge"] >= 16.0, loo
    mean = np.mean([u for fid, u, _ in items if fid == "ref_50"], axis=0)
    assert np.abs(prior.field("ref_50", next(iter(feats.values()))) - mean).max() < 0.2


@pytest.mark.parametrize("patients", [1, 6])
def test_too_few_patients_give_zero_slopes(caplog, patients):
    items, feats, _, _ = _cohort(patients, 1.0, 0.05)
    prior = MotionPrior.from_fields(items, {}, "regressed", feats)
    assert prior.meta["regression"]["ridge"] == RIDGE_GRID[-1] and not np.any(prior.slopes)
    assert "too few" in caplog.text
    mean = np.mean([u for fid, u, _ in items if fid == "ref_10"], axis=0)
    assert np.allclose(prior.field("ref_10", feats["p0"]), mean, atol=1e-4)


def test_leave_one_out_matches_refitting_without_each_patient():
    """The closed-form leave-one-out error equals refitting the regression without each patient in turn."""
    from respmotion.models.prior import _ridge_solve

    items, feats, _, _ = _cohort(12, 0.5, 0.5, seed=1)
    prior = MotionPrior.from_fields(items, {}, "regressed", feats)
    table = np.array(list(feats.values()))
    mean, std = table.mean(0), table.std(0)
    x = {k: np.r_[1.0, np.clip((v - mean) / std, -FEATURE_LIMIT, FEATURE_LIMIT)] for k, v in feats.items()}
    ridge = 2.0
    sq, count = 0.0, 0
    for fid, u, key in items:
        rest = [(x[k], v) for f, v, k in items if f == fid and k != key]
        gram = sum(np.outer(a, a) for a, _ in rest)
        sums = sum(np.tensordot(a, v, 0) for a, v in rest)
        pred = np.tensordot(x[key], _ridge_solve(gram, sums, ridge), 1)
        sq += float(((pred - u) ** 2).sum())
        count += u[0].size
    assert prior.meta["regression"]["leave_one_out_rms_mm"][str(ridge)] == pytest.approx(np.sqrt(sq / count), rel=1e-6)
