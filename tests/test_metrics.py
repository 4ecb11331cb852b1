"""Motion and image metrics on fields and masks with known answers."""

import math

import numpy as np
import pytest

from respmotion.anatomy.measures import diaphragm_excursion, lung_base_shift
from respmotion.core import DisplacementField, Geometry, Volume
from respmotion.evaluation.metrics import (
    breathing_curve,
    dvf_error,
    folding_percent,
    image_similarity,
    lung_volume_change,
    lung_volume_ml,
    sample_diversity,
    warp_mask,
)

SHAPE = (24, 20, 22)  # z, y, x
GEOM = Geometry(SHAPE, (2.0, 1.0, 1.5), (-20.0, 10.0, 5.0))


def const_field(vec_zyx, geom=GEOM):
    arr = np.broadcast_to(np.asarray(vec_zyx, np.float32)[:, None, None, None], (3, *geom.shape))
    return DisplacementField(arr.copy(), geom)


def box_mask(z0, z1, geom=GEOM):
    m = np.zeros(geom.shape, np.uint8)
    m[z0:z1, 5:15, 6:16] = 1
    return Volume(m, geom)


def test_dvf_error_inside_mask():
    ref = const_field([1.0, 0.0, 0.0])
    pred_arr = ref.array.copy()
    pred_arr[1] += 3.0
    pred_arr[2, :12] += 4.0  # 5 mm error in the lower half, 3 mm in the upper
    pred = DisplacementField(pred_arr, GEOM)
    full = dvf_error(pred, ref)
    assert full["mean"] == pytest.approx(4.0) and full["max"] == pytest.approx(5.0)
    lower = np.zeros(SHAPE, bool)
    lower[:12] = True
    assert dvf_error(pred, ref, mask=lower)["mean"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="geometry"):
        dvf_error(pred, const_field([0, 0, 0], Geometry(SHAPE, (1.0, 1.0, 1.0))))


def test_image_similarity_known_offset():
    rng = np.random.default_rng(0)
    real = Volume(rng.uniform(-900, 800, SHAPE).astype(np.float32), GEOM)
    same = image_similarity(real, real)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-4) and same["mae_hu"] == 0.0
    shifted = Volume(real.array + 100.0, GEOM)  # stays inside the [-1000, 1000] HU window
    res = image_similarity(shifted, real, mask=box_mask(2, 10))
    assert res["mae_hu"] == pytest.approx(100.0) and res["mae_hu_mask"] == pytest.approx(100.0)
    assert res["psnr_db"] == pytest.approx(20 * math.log10(2000.0 / 100.0), abs=1e-3)
    assert res["data_range_hu"] == 2000.0
    noisy = Volume(real.array + rng.normal(0, 300, SHAPE).astype(np.float32), GEOM)
    assert image_similarity(noisy, real)["ssim"] < 0.9


def test_folding_percent_half_folded():
    x_mm = np.arange(SHAPE[2]) * GEOM.spacing[2]
    arr = np.zeros((3, *SHAPE), np.float32)
    arr[2, :12] = -2.0 * x_mm  # d u_x / d x = -2 -> det(I + grad u) = -1 in the lower half
    field = DisplacementField(arr, GEOM)
    assert folding_percent(field) == pytest.approx(50.0)
    assert folding_percent(const_field([3.0, -2.0, 1.0])) == 0.0
    upper = np.zeros(SHAPE, bool)
    upper[12:] = True
    assert folding_percent(field, mask=upper) == 0.0


def test_lung_volume_and_change_under_scaling():
    mask = box_mask(2, 22)  # 20 slices x 10 x 10 voxels of 2 x 1 x 1.5 mm = 6 ml
    assert lung_volume_ml(mask) == pytest.approx(6.0)
    assert lung_volume_change(mask, warp_mask(mask, const_field([0.0, 0.0, 0.0])))["change_ml"] == 0.0
    # pull u_z = s (z - z_c): the box shrinks along z by 1 / (1 + s)
    s = 0.25
    z_mm = (np.arange(SHAPE[0]) - 11.5) * GEOM.spacing[0]
    arr = np.zeros((3, *SHAPE), np.float32)
    arr[0] = s * z_mm[:, None, None]
    change = lung_volume_change(mask, warp_mask(mask, DisplacementField(arr, GEOM)))
    assert change["change_percent"] == pytest.approx(-20.0, abs=1.0)


@pytest.mark.parametrize("dz_sign", [1.0, -1.0])
def test_diaphragm_excursion_sign(dz_sign):
    geom = Geometry(SHAPE, (2.0, 1.0, 1.5), (-20.0, 10.0, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, dz_sign))
    mask = box_mask(4, 14, geom)
    # pull u_z = -6 mm: anatomy moves +6 mm along array z, i.e. superior when array z points to LPS +z
    field = const_field([-6.0, 0.0, 0.0], geom)
    exc = diaphragm_excursion(mask, field)
    assert exc["mean_mm"] == pytest.approx(6.0 * dz_sign, abs=1e-3)
    assert exc["n_columns"] == 100
    shift = lung_base_shift(mask, warp_mask(mask, field))
    assert shift["mean_mm"] == pytest.approx(6.0 * dz_sign, abs=1e-6)


def test_breathing_curve_and_diversity():
    curve = breathing_curve({50: const_field([0.0, 3.0, 4.0]), 0: None})
    assert curve == {"0": 0.0, "50": pytest.approx(5.0)}
    samples = [const_field([0.0, 0.0, v]) for v in (0.0, 1.0, 3.0)]
    div = sample_diversity(samples)
    assert div["mean_pairwise_mm"] == pytest.approx(2.0) and div["n_pairs"] == 3
    with pytest.raises(ValueError, match="at least 2"):
        sample_diversity(samples[:1])
