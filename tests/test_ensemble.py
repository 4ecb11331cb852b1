"""Generator scores (respmotion.evaluation.ensemble) and the CT's lung features (respmotion.anatomy.features)
on cases with a known answer."""

import numpy as np
import pytest

from respmotion.anatomy.features import LUNG_FEATURES, lung_features, outside_training
from respmotion.evaluation.ensemble import energy_score, ensemble_scores


def _uniform(values_z, shape=(2, 3, 4)):
    """Fields (K, 3, z, y, x) mm that move every voxel by ``values_z`` mm along z (one value per sample)."""
    out = np.zeros((len(values_z), 3, *shape))
    out[:, 0] = np.asarray(values_z, dtype=float)[:, None, None, None]
    return out


def test_energy_score_mean_error_and_spread_known_answer():
    lung = np.ones((2, 3, 4), bool)
    truth = np.zeros((3, 2, 3, 4))
    scores = ensemble_scores(_uniform([1.0, 3.0]), truth, lung)
    # E|X - y| = (1 + 3) / 2 = 2; E|X - X'| = 2 -> ES = 2 - 1 = 1; mean field 2 mm off; spread sqrt(2)
    assert scores["energy_score"] == pytest.approx(1.0)
    assert scores["mean_error"] == pytest.approx(2.0)
    assert scores["single_sample_error"] == pytest.approx(1.0)
    assert scores["spread"] == pytest.approx(np.sqrt(2.0))
    # three samples: E|X - y| = 2, pairs |1-2|, |1-3|, |2-3| -> mean 4/3, ES = 2 - 2/3
    assert energy_score(_uniform([1.0, 2.0, 3.0]), truth, lung) == pytest.approx(2.0 - 2.0 / 3.0)


def test_energy_score_of_a_point_forecast_is_its_error_and_only_the_mask_counts():
    lung = np.zeros((2, 3, 4), bool)
    lung[0] = True
    truth = np.zeros((3, 2, 3, 4))
    x = _uniform([2.5, 2.5, 2.5])
    x[:, 1, 1] = 100.0  # outside the lung: ignored
    s = ensemble_scores(x, truth, lung)
    assert s["energy_score"] == pytest.approx(2.5) and s["mean_error"] == pytest.approx(2.5)
    assert s["spread"] == pytest.approx(0.0)


def test_energy_score_prefers_the_true_distribution():
    """Proper: for truths drawn from N(0, 1) along z, samples from N(0, 1) score better on average than a
    sharper (N(0, 0.2)) or a shifted (N(1, 1)) generator."""
    rng = np.random.default_rng(0)
    lung = np.ones((1, 1, 1), bool)
    mean_score = {}
    for name, (mu, sd) in {"true": (0.0, 1.0), "sharp": (0.0, 0.2), "shifted": (1.0, 1.0)}.items():
        rng_s = np.random.default_rng(1)
        scores = []
        for _ in range(400):
            y = _uniform([rng.normal()], (1, 1, 1))[0]
            scores.append(energy_score(_uniform(rng_s.normal(mu, sd, 16), (1, 1, 1)), y, lung))
        mean_score[name] = np.mean(scores)
        rng = np.random.default_rng(0)  # the same truths for every generator
    assert mean_score["true"] < mean_score["sharp"] and mean_score["true"] < mean_score["shifted"], mean_score


def test_ensemble_scores_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="must agree"):
        ensemble_scores(np.zeros((2, 3, 2, 2, 2)), np.zeros((3, 2, 2, 3)), np.ones((2, 2, 2), bool))


def test_lung_features_of_a_box_of_air_in_tissue():
    """A 10-slice (2 mm) box of air, 8 x 8 voxels of 1 mm, inside 40 HU tissue: 1.28 ml of gas, 20 mm per column."""
    hu = np.full((20, 24, 24), -1000.0, np.float32)
    hu[1:19, 2:22, 2:22] = 40.0  # body
    hu[5:15, 8:16, 8:16] = -1000.0  # lung
    f = dict(zip(LUNG_FEATURES, lung_features(hu, (2.0, 1.0, 1.0))))
    assert f["lung_gas_ml"] == pytest.approx(1.28)
    assert f["lung_height_mean_mm"] == pytest.approx(20.0)
    assert f["lung_height_p90_mm"] == pytest.approx(20.0)
    # partial-volume voxels count by their gas: half-gas slices below the box add 1 mm to every column
    hu[15, 8:16, 8:16] = -500.0
    f2 = dict(zip(LUNG_FEATURES, lung_features(hu, (2.0, 1.0, 1.0))))
    assert f2["lung_height_mean_mm"] == pytest.approx(21.0)


def test_lung_features_refuse_a_ct_without_lungs():
    with pytest.raises(ValueError, match="no lung"):
        lung_features(np.zeros((8, 16, 16), np.float32), (2.0, 1.0, 1.0))


def test_outside_training_names_each_feature_beyond_the_limit():
    mean, std = [2000.0, 80.0, 95.0], [200.0, 3.0, 4.0]
    assert outside_training([2100.0, 82.0, 90.0], mean, std, 3.0) == []
    far = outside_training([2100.0, 140.0, 70.0], mean, std, 3.0)
    assert far == ["lung_height_mean_mm 140 is 20.0 sd above the training mean 80 (sd 3)",
                   "lung_height_p90_mm 70 is 6.2 sd below the training mean 95 (sd 4)"]
