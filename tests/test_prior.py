"""The anatomical motion prior: population motion expressed in a CT's own lungs (moves lungs, not the spine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from respmotion.anatomy.lung_frame import lung_box, motion_regions, normalised, voxel_points
from respmotion.core import warp as W
from respmotion.core.geometry import Geometry
from respmotion.core.ops import resample_volume
from respmotion.core.types import Volume
from respmotion.data.phantom import Phantom
from respmotion.models.anatomical_prior import AnatomicalPrior, PriorMotion

SHAPE = (24, 64, 64)


@pytest.fixture(scope="module")
def ct():
    ph = Phantom(5, SHAPE, noise_hu=0.0)
    return Volume(ph.phase(0)["image"], ph.geometry)


def _spine(hu: np.ndarray, dx: int = 0) -> np.ndarray:
    """Vertebral bodies: dense bone in the posterior midline (the phantom's spine; ``dx`` voxels off centre)."""
    z, y, x = np.indices(hu.shape)
    mid = np.abs(x - hu.shape[2] / 2 - dx) < hu.shape[2] * 0.06
    return (hu > 400) & mid & (y > hu.shape[1] * 0.6)


def _check(hu: np.ndarray, geometry: Geometry, dx: int = 0) -> dict[int, np.ndarray]:
    fields = AnatomicalPrior().fields(hu, geometry, phases=[0, 50])
    reg = motion_regions(hu, geometry)
    mag = np.linalg.norm(fields[50], axis=0)
    spine = _spine(hu, dx)
    assert spine.sum() > 10
    assert mag[spine].max() <= 1.0  # the spine does not move
    assert mag[reg["lung"]].mean() > 3.0  # the lungs do (median DIR-Lab amplitude 6.7 mm)
    up = geometry.axes_to_world(fields[50], axis=0)[2]
    assert -up[reg["lung"]].mean() > 3.0  # pull field: lung content comes from below at end-exhale
    assert np.abs(fields[0]).max() == 0.0
    return fields


def test_prior_moves_lungs_not_spine_on_shifted_and_scaled_cts(ct):
    base = _check(ct.array, ct.geometry)
    # shifted: the anatomy 3 voxels (17 mm) to the patient's left and 3 posterior (padding with air)
    shifted = np.full_like(ct.array, -1000.0)
    shifted[:, 3:, 3:] = ct.array[:, :-3, :-3]
    f_shift = _check(shifted, ct.geometry, dx=3)
    # the field moves with the anatomy: the shifted CT's field is the shifted field
    diff = np.abs(f_shift[50][:, :, 3:, 3:] - base[50][:, :, :-3, :-3])
    assert diff.mean() < 0.05 and np.percentile(diff, 99) < 0.5
    # scaled: a larger patient (spacing x 1.25) on a different grid (resampled to 20 x 48 x 56)
    big = Geometry(ct.geometry.shape, tuple(s * 1.25 for s in ct.geometry.spacing), ct.geometry.origin)
    scaled = resample_volume(Volume(ct.array, big), (20, 48, 56))
    f_big = _check(scaled.array, scaled.geometry)
    reg, reg_big = motion_regions(ct.array, ct.geometry), motion_regions(scaled.array, scaled.geometry)
    # motion per normalised lung position does not depend on the size: mean lung superior motion within 15 %
    up = -ct.geometry.axes_to_world(base[50], axis=0)[2][reg["lung"]].mean()
    up_big = -scaled.geometry.axes_to_world(f_big[50], axis=0)[2][reg_big["lung"]].mean()
    assert up_big == pytest.approx(up, rel=0.15)


def test_pull_field_moves_points_by_the_model_push(ct):
    prior = AnatomicalPrior(amplitude_mm=8.0)
    g = ct.geometry
    reg = motion_regions(ct.array, g)
    fields = prior.fields(ct.array, g, phases=[50], regions=reg)
    push = prior.amplitude_mm * prior.unit_push(ct.array, g, reg)  # LPS x, y, z at s = h = 1
    s, h = prior.states(50)
    # points well inside the lungs (2 voxels from any border)
    lung = reg["lung"].copy()
    for ax in range(3):
        lung &= np.roll(reg["lung"], 2, ax) & np.roll(reg["lung"], -2, ax)
    idx = np.argwhere(lung)[::7].astype(np.float64)
    moved = W.move_points(torch.from_numpy(fields[50]), torch.from_numpy(idx), g.spacing).numpy()
    got_mm = (moved - idx) * np.asarray(g.spacing)
    p = tuple(idx.astype(int).T)
    want_xyz = np.stack([h * push[0][p], h * push[1][p], s * push[2][p]], 1)
    want = g.world_to_axes(want_xyz)
    assert np.abs(got_mm - want).mean() < 0.1
    # lateral motion is mirrored: at exhale both lungs move medially on average (DIR-Lab: lateral < 0)
    left, right = p[2] > g.shape[2] / 2, p[2] < g.shape[2] / 2
    assert want_xyz[left, 0].mean() < 0 < want_xyz[right, 0].mean()


def test_amplitude_is_the_mean_superior_lung_motion_at_50(ct):
    from respmotion.synthesis.breathing import superior_mean
    from respmotion.core.types import DisplacementField

    model = PriorMotion(amplitude_mm=5.0, shape=SHAPE)
    cycle = model.generate(ct, 1, 0)[0]
    reg = motion_regions(ct.array, ct.geometry)
    assert superior_mean(cycle[50], reg["lung"]) == pytest.approx(5.0, rel=0.15)
    assert isinstance(cycle[50], DisplacementField) and "no network" in cycle[50].meta["model"]
    with pytest.raises(ValueError, match="amplitude"):
        AnatomicalPrior(amplitude_mm=-1.0)


def test_normalised_coordinates_follow_the_lungs(ct):
    reg = motion_regions(ct.array, ct.geometry)
    pts = voxel_points(ct.geometry, reg["lung"])
    n = normalised(pts, lung_box(pts))
    top = pts[:, 2] >= np.percentile(pts[:, 2], 95)
    assert n[top, 0].mean() < 0.1 < 0.9 < n[pts[:, 2] <= np.percentile(pts[:, 2], 5), 0].mean()  # apex 0, base 1
    assert 0.0 <= n.min() and n.max() <= 1.0
