"""Conventions of the core: sign, order and units of warping, composition and export."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from respmotion.core import DisplacementField, Geometry, Volume
from respmotion.core import ops
from respmotion.core import grid
from respmotion.core.geometry import (direction_from_orientation, level_positions, level_to_normalized,
                                       normalized_to_index, slice_normal)
from respmotion.core import warp as W
from respmotion.io.volumes import load_field, load_volume, save_field, save_volume

SPACING = (2.0, 1.5, 1.0)  # z, y, x mm


def blob(shape, centre_idx, sigma=3.0):
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    d2 = (zz - centre_idx[0]) ** 2 + (yy - centre_idx[1]) ** 2 + (xx - centre_idx[2]) ** 2
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def centroid(a):
    grids = np.meshgrid(*[np.arange(n) for n in a.shape], indexing="ij")
    return np.array([(g * a).sum() / a.sum() for g in grids])


def test_translation_sign_order_units():
    shape = (24, 32, 40)
    geom = Geometry(shape, SPACING)
    moving = Volume(blob(shape, (12, 16, 20)), geom)
    t_mm = np.array([2.0, -3.0, 4.0])  # +2 mm z, -3 mm y, +4 mm x
    field = DisplacementField(np.broadcast_to(t_mm[:, None, None, None], (3, *shape)).astype(np.float32).copy(), geom)
    warped = ops.warp_volume(moving, field)
    # pull: warped(p) = moving(p + t) -> content moves by -t
    shift_vox = centroid(warped.array) - centroid(moving.array)
    np.testing.assert_allclose(shift_vox * np.array(SPACING), -t_mm, atol=0.05)


def test_field_roundtrip_nifti_mha(tmp_path):
    shape = (5, 6, 7)
    direction = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)  # rotated axes
    geom = Geometry(shape, SPACING, (-10.0, 20.5, 30.25), tuple(direction.ravel()))
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(3, *shape)).astype(np.float32)
    field = DisplacementField(arr, geom)
    for name in ("f.nii.gz", "f.mha", "f.nrrd", "f.npy"):
        back = load_field(save_field(field, tmp_path / name))
        assert back.geometry.same_as(geom), name
        np.testing.assert_allclose(back.array, arr, atol=1e-5, err_msg=name)
    vol = Volume(rng.normal(size=shape).astype(np.float32), geom)
    for name in ("v.nii.gz", "v.mha", "v.npy"):
        back = load_volume(save_volume(vol, tmp_path / name))
        assert back.geometry.same_as(geom), name
        np.testing.assert_allclose(back.array, vol.array, atol=1e-6, err_msg=name)


def test_world_vectors_follow_direction():
    direction = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    geom = Geometry((2, 2, 2), SPACING, (0, 0, 0), tuple(direction.ravel()))
    # a step of one voxel along array x = spacing_x mm along direction column 0
    w = geom.index_to_world([0, 0, 1]) - geom.index_to_world([0, 0, 0])
    np.testing.assert_allclose(w, direction[:, 0] * SPACING[2])
    np.testing.assert_allclose(geom.axes_to_world(np.array([0.0, 0.0, SPACING[2]])), w)
    np.testing.assert_allclose(geom.world_to_index(geom.index_to_world([1.2, 0.3, 0.7])), [1.2, 0.3, 0.7])


def test_compose_matches_analytic_not_sum():
    shape = (16, 20, 24)
    sp = (1.0, 1.0, 1.0)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    # u(p) = (0.1 * y, 0, 0) (z shear); v(p) = (0, 0.05 * x + 1, 0)
    u = torch.stack([0.1 * y, torch.zeros_like(y), torch.zeros_like(y)])[None]
    v = torch.stack([torch.zeros_like(y), 0.05 * x + 1.0, torch.zeros_like(y)])[None]
    w = W.compose(u, v, sp)
    # analytic: w(p) = v(p) + u(p + v(p)) = (0.1 * (y + 0.05 x + 1), 0.05 x + 1, 0)
    expect = torch.stack([0.1 * (y + 0.05 * x + 1.0), 0.05 * x + 1.0, torch.zeros_like(y)])[None]
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -4), slice(1, -1))  # p + v(p) stays inside
    assert torch.allclose(w[inner], expect[inner], atol=1e-6)
    assert not torch.allclose((u + v)[inner], expect[inner], atol=1e-2)
    # and warping twice equals warping once by the composition
    img = torch.rand(1, 1, *shape, dtype=torch.float64)
    twice = W.warp(W.warp(img, u, sp), v, sp)
    once = W.warp(img, w, sp)
    core = (slice(None), slice(None), slice(2, -2), slice(2, -4), slice(2, -2))
    assert torch.allclose(twice[core], once[core], atol=0.05)


def test_move_points_inverts_pull():
    shape = (20, 20, 20)
    sp = (2.0, 1.0, 1.5)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    u = torch.stack([1.5 * torch.sin(y / 6), 0.8 * torch.cos(x / 5), 0.5 * z / 20])
    p = torch.tensor([[10.0, 8.0, 7.0], [5.5, 12.0, 3.0]], dtype=torch.float64)
    q = W.move_points(u, p, sp)
    back = W.pull_points(u, q, sp)
    assert torch.allclose(back, p, atol=1e-4)


def test_jacobian_of_scaling():
    shape = (10, 10, 10)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    u = torch.stack([0.2 * z, -0.5 * y, torch.zeros_like(x)])[None]  # mm, spacing 1
    det = W.jacobian_determinant(u, (1.0, 1.0, 1.0))
    assert torch.allclose(det, torch.full_like(det, 1.2 * 0.5))
    fold = torch.stack([-2.0 * z, torch.zeros_like(y), torch.zeros_like(x)])[None]
    assert W.folding_fraction(fold, (1.0, 1.0, 1.0)) == 1.0


def test_resized_geometry_keeps_field_of_view():
    g = Geometry((10, 100, 100), (3.0, 1.0, 1.0), (5.0, -2.0, 7.0))
    r = g.resized((5, 50, 25))
    lo_old = g.index_to_world([-0.5, -0.5, -0.5])
    lo_new = r.index_to_world([-0.5, -0.5, -0.5])
    np.testing.assert_allclose(lo_old, lo_new)
    hi_old = g.index_to_world(np.array(g.shape) - 0.5)
    hi_new = r.index_to_world(np.array(r.shape) - 0.5)
    np.testing.assert_allclose(hi_old, hi_new)


def test_exp_velocity_is_invertible_and_scales():
    shape = (12, 16, 16)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    v = torch.stack([3.0 * torch.exp(-((y - 8) ** 2 + (x - 8) ** 2) / 20), 0 * y, 0 * x])[None]
    u1 = W.exp_velocity(v, (1.0, 1.0, 1.0))
    u2 = W.exp_velocity(2 * v, (1.0, 1.0, 1.0))
    assert W.folding_fraction(u2, (1.0, 1.0, 1.0)) == 0.0
    assert float(u2.abs().max()) > 1.8 * float(u1.abs().max())


def test_jacobian_kernel_matches_linalg_det_in_both_precisions():
    shape = (6, 7, 8)
    sp = (2.0, 1.5, 1.0)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    u = torch.stack([0.8 * torch.sin(y / 3) + 0.1 * x, 0.5 * torch.cos(z / 2), 0.3 * y * z / 10])[None]
    det64 = W.jacobian_determinant(u, sp)
    # reference: torch.gradient in voxel units and torch.linalg.det of the 3x3 matrices
    ddf = u[0] / torch.as_tensor(sp, dtype=torch.float64)[:, None, None, None]
    jac = torch.stack([torch.stack(torch.gradient(ddf[c], dim=(0, 1, 2))) for c in range(3)]) + torch.eye(
        3, dtype=torch.float64)[:, :, None, None, None]
    ref = torch.linalg.det(jac.permute(2, 3, 4, 0, 1))
    torch.testing.assert_close(det64[0], ref)
    det32 = W.jacobian_determinant(u.float(), sp, dtype=torch.float32)
    assert det32.dtype == torch.float32
    torch.testing.assert_close(det32[0].double(), ref, atol=1e-5, rtol=0)
    j = [[jac[r, c] for c in range(3)] for r in range(3)]
    torch.testing.assert_close(W.det3(j), ref)
    cof = W.cofactors3(j)  # d det / d j: det = sum_c j[r][c] cof[r][c] along any row
    torch.testing.assert_close(sum(j[1][c] * cof[1][c] for c in range(3)), ref)


def test_affine_itk_and_dicom_records_roundtrip():
    direction = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    geom = Geometry((5, 6, 7), SPACING, (-10.0, 20.5, 30.25), tuple(direction.ravel()))
    assert Geometry.from_affine(geom.index_to_world_matrix(), geom.shape).same_as(geom)
    assert Geometry.from_affine(geom.ras_affine(), geom.shape, ras=True).same_as(geom)
    np.testing.assert_allclose(geom.ras_affine()[:2], -geom.index_to_world_matrix()[:2])
    itk = Geometry.from_itk((7, 6, 5), SPACING[::-1], geom.origin, geom.direction)
    assert itk.same_as(geom)
    iop = geom.image_orientation()
    np.testing.assert_allclose(iop, [0, 1, 0, -1, 0, 0])
    np.testing.assert_allclose(slice_normal(iop), direction[:, 2])
    np.testing.assert_allclose(direction_from_orientation(iop), geom.direction)


def test_axis_codes_and_superior_sign():
    # array z runs inferior (LPS -z), array y runs along LPS x, array x along LPS y (tilted 10 degrees)
    t = np.radians(10.0)
    d = np.array([[0.0, 1.0, 0.0], [np.cos(t), 0.0, 0.0], [np.sin(t), 0.0, -1.0]])
    geom = Geometry((4, 5, 6), SPACING, (0, 0, 0), tuple(d.ravel()))
    axes = geom.nearest_world_axes()
    assert [a[:2] for a in axes] == [(2, -1), (0, 1), (1, 1)]
    assert axes[0][2] == pytest.approx(0.0) and axes[2][2] == pytest.approx(10.0)
    assert geom.superior_sign() == -1.0
    np.testing.assert_allclose(geom.superior_mm(np.array([1, -2])), [-SPACING[0], 2 * SPACING[0]])
    lying = Geometry((4, 5, 6), SPACING, (0, 0, 0), (1, 0, 0, 0, 0, 1, 0, 1, 0))
    with pytest.raises(ValueError, match="superior-inferior"):
        lying.superior_sign()


def test_pyramid_level_coordinates_and_unit_factors():
    full, level = 50, 13
    pos = level_positions(full, level)
    a, b = level_to_normalized(full, level)
    # level voxel q sits at grid_sample coordinate 2 q / (level - 1) - 1 (align_corners=True)
    np.testing.assert_allclose(a * pos + b, 2.0 * np.arange(level) / (level - 1) - 1.0, atol=1e-12)
    # same field of view: the level's voxel edges are the full grid's
    np.testing.assert_allclose([pos[0] - 0.5 * full / level, pos[-1] + 0.5 * full / level], [-0.5, full - 0.5])
    sp = (3.0, 1.5, 0.5)
    scale = W.mm_to_normalized(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), sp)
    torch.testing.assert_close(scale, torch.tensor([8.0, 4 / 3, 1 / 3], dtype=torch.float64))
    g = W.mm_to_voxel_gradient(sp, torch.tensor([[2.0], [1.0], [1.0]], dtype=torch.float64))
    assert g.shape == (3, 3, 1) and float(g[0, 0, 0]) == pytest.approx(1 / 6) and float(g[2, 1, 0]) == 2.0
    assert W.step_mm(sp, (0, 2)) == 1.5 and W.step_mm(sp, (1,)) == 1.5 and W.step_mm(sp, ()) == 1.0


def test_grid_axis_helpers_and_centred_geometry():
    g = Geometry.centred((4, 6, 5), (12.0, 18.0, 10.0))
    assert g.spacing == (3.0, 3.0, 2.0)
    # field of view (voxel edges) centred on the origin: first centre half a voxel inside -fov / 2
    np.testing.assert_allclose(g.axis_mm(0), [-4.5, -1.5, 1.5, 4.5])
    np.testing.assert_allclose(g.axis_mm(2), g.index_to_world(np.stack([np.zeros(5), np.zeros(5), np.arange(5)], 1))[:, 0])
    with pytest.raises(ValueError, match="identity"):
        Geometry((2, 2, 2), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)).axis_mm(0)
    np.testing.assert_allclose(grid.centres_from_edge(3, 2.0, -3.0), [-2.0, 0.0, 2.0])
    np.testing.assert_allclose(grid.to_mm((2, 3), (1.5, 0.5)), [3.0, 1.5])
    np.testing.assert_allclose(grid.to_voxels(3.0, (1.5, 0.5)), [2.0, 6.0])
    assert grid.axis_index(4.5, -1.5, 3.0) == 2.0
    # grid_sample (align_corners=True) at the normalised coordinate of a position reads that position
    values = torch.arange(5, dtype=torch.float32)
    pos = torch.tensor([-4.0, 1.0, 3.5], dtype=torch.float32)  # mm on centres -4 + 2.5 i
    norm = grid.axis_to_normalized_(pos.clone(), -4.0, 2.5, 5)
    pts = torch.stack([norm, torch.zeros(3), torch.zeros(3)], -1).reshape(1, -1, 1, 1, 3)
    read = F.grid_sample(values.reshape(1, 1, 1, 1, 5), pts, align_corners=True).ravel()
    torch.testing.assert_close(read, (pos + 4.0) / 2.5)


def test_grid_ball_and_normalized_to_index():
    b = grid.ball((2.0, 1.0, 1.0), 2.0)
    assert b.shape == (3, 5, 5) and b[1, 2, 2] and b[0, 2, 2] and not b[0, 2, 3] and b[1, 0, 2] and not b[1, 0, 1]
    assert grid.ball((3.0, 3.0), 1.0, min_half_width=1).shape == (3, 3)
    n = 7
    for align in (False, True):
        idx = torch.arange(n, dtype=torch.float64)
        g = (2 * idx + 1) / n - 1 if not align else 2 * idx / (n - 1) - 1
        torch.testing.assert_close(normalized_to_index(g, n, align_corners=align), idx)
    u = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(W.voxels_to_mm(W.mm_to_voxels(u, (2.5, 1.0, 0.7)), (2.5, 1.0, 0.7)), u)
