"""Warping, composition, point motion and Jacobians of displacement fields (torch, batched).

Every stage warps through :func:`warp`; conventions are those of :mod:`respmotion.core.types`:
fields are ``(B, 3, Z, Y, X)`` tensors in mm with components ``(z, y, x)``, pull convention
``warped(p) = moving(p + u(p))``.  ``spacing`` is ``(sz, sy, sx)`` in mm (a sequence, or a
``(B, 3)`` tensor when the batch mixes spacings).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

Spacing = Union[Sequence[float], torch.Tensor]


def _spacing_tensor(spacing: Spacing, ref: torch.Tensor) -> torch.Tensor:
    """Spacing as a ``(B or 1, 3, 1, 1, 1)`` tensor matching ``ref``'s device/dtype."""
    s = torch.as_tensor(spacing, dtype=ref.dtype, device=ref.device)
    if s.ndim == 1:
        s = s[None]
    return s[:, :, None, None, None]


@lru_cache(maxsize=8)
def _monai_warp(mode: str, padding: str):
    from monai.networks.blocks import Warp

    with warnings.catch_warnings():
        # MONAI notes that it falls back to torch's grid_sample; that is what we want.
        warnings.simplefilter("ignore")
        return Warp(mode=mode, padding_mode=padding)


def mm_to_voxels(dvf_mm: torch.Tensor, spacing: Spacing) -> torch.Tensor:
    """Field in mm -> field in voxels (same component order z, y, x)."""
    return dvf_mm / _spacing_tensor(spacing, dvf_mm)


def voxels_to_mm(ddf_vox: torch.Tensor, spacing: Spacing) -> torch.Tensor:
    """Field in voxels ``(B, 3, Z, Y, X)`` -> field in mm (same component order z, y, x)."""
    return ddf_vox * _spacing_tensor(spacing, ddf_vox)


def warp(
    image: torch.Tensor,
    dvf_mm: torch.Tensor,
    spacing: Spacing,
    mode: str = "bilinear",
    padding: str = "border",
) -> torch.Tensor:
    """Pull ``image`` ``(B, C, Z, Y, X)`` through ``dvf_mm`` ``(B, 3, Z, Y, X)``.

    Returns ``out`` with ``out(p) = image(p + u(p))`` (trilinear for ``mode="bilinear"``).
    Uses MONAI's :class:`~monai.networks.blocks.Warp` (voxel-unit DDF, channels in array-axis order).
    """
    if image.ndim != 5 or dvf_mm.ndim != 5 or dvf_mm.shape[1] != 3:
        raise ValueError(f"warp expects image (B,C,Z,Y,X) and field (B,3,Z,Y,X); got {tuple(image.shape)}, {tuple(dvf_mm.shape)}")
    ddf = mm_to_voxels(dvf_mm.to(image.dtype), spacing)
    if ddf.shape[0] != image.shape[0]:
        ddf = ddf.expand(image.shape[0], -1, -1, -1, -1)
    return _monai_warp(mode, padding)(image, ddf)


def compose(u: torch.Tensor, v: torch.Tensor, spacing: Spacing) -> torch.Tensor:
    """Field ``w`` with ``warp(warp(I, u), v) == warp(I, w)``: ``w(p) = v(p) + u(p + v(p))``.

    Example: ``u`` pulls the reference to phase k, ``v`` pulls phase k to phase k+1; then
    ``compose(u, v)`` pulls the reference to phase k+1.  (Not ``u + v``.)
    """
    return v + warp(u, v, spacing, padding="border")


def sample_points(field: torch.Tensor, index_zyx: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``field`` ``(C, Z, Y, X)`` at continuous voxel indices ``(N, 3)`` -> ``(N, C)``."""
    shape = torch.as_tensor(field.shape[1:], dtype=index_zyx.dtype, device=index_zyx.device)
    norm = 2.0 * index_zyx / torch.clamp(shape - 1, min=1) - 1.0
    grid = norm.flip(-1)[None, :, None, None, :].to(field.dtype)  # (1, N, 1, 1, 3) in x,y,z
    out = F.grid_sample(field[None], grid, mode=mode, padding_mode="border", align_corners=True)
    return out[0, :, :, 0, 0].T


def pull_points(dvf_mm: torch.Tensor, index_zyx: torch.Tensor, spacing: Spacing) -> torch.Tensor:
    """Where fixed-grid points come from in the moving image: ``p + u(p)`` (voxel indices)."""
    s = torch.as_tensor(spacing, dtype=index_zyx.dtype, device=index_zyx.device)
    return index_zyx + sample_points(dvf_mm, index_zyx).to(index_zyx.dtype) / s


def move_points(
    dvf_mm: torch.Tensor, index_zyx: torch.Tensor, spacing: Spacing, iterations: int = 50, tol: float = 1e-5
) -> torch.Tensor:
    """Push points of the *moving* image into the fixed frame: solve ``q + u(q) = p``.

    This is the direction in which anatomy (landmarks, contours) moves: a point ``p`` of the
    reference that the field pulls from lands at ``q``.  Fixed-point iteration
    ``q <- p - u(q)``, which converges for invertible fields with moderate gradients.
    ``dvf_mm`` is ``(3, Z, Y, X)``, points ``(N, 3)`` voxel indices, result in voxel indices.
    """
    s = torch.as_tensor(spacing, dtype=index_zyx.dtype, device=index_zyx.device)
    q = index_zyx.clone()
    for _ in range(iterations):
        q_new = index_zyx - sample_points(dvf_mm, q).to(q.dtype) / s
        done = torch.max(torch.abs(q_new - q)) < tol
        q = q_new
        if done:
            break
    return q


def det3(j):
    """Determinant of 3x3 matrices given as nested lists ``j[row][col]`` of equally shaped tensors (elementwise).

    The one determinant expression of the package (dense fields, B-spline knots, folding probes)."""
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def cofactors3(j):
    """Cofactor matrix (= d det / d j) of :func:`det3`'s nested-list matrices."""
    return [[j[1][1] * j[2][2] - j[1][2] * j[2][1], j[1][2] * j[2][0] - j[1][0] * j[2][2], j[1][0] * j[2][1] - j[1][1] * j[2][0]],
            [j[0][2] * j[2][1] - j[0][1] * j[2][2], j[0][0] * j[2][2] - j[0][2] * j[2][0], j[0][1] * j[2][0] - j[0][0] * j[2][1]],
            [j[0][1] * j[1][2] - j[0][2] * j[1][1], j[0][2] * j[1][0] - j[0][0] * j[1][2], j[0][0] * j[1][1] - j[0][1] * j[1][0]]]


def _difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Derivative per voxel along ``dim``: central inside, one-sided at the borders (the numbers of
    ``torch.gradient`` with unit spacing, by slicing into one preallocated tensor; 0 along a length-1 axis)."""
    g = torch.empty_like(x)
    n = x.shape[dim]
    if n == 1:
        return g.zero_()
    g.narrow(dim, 1, n - 2).copy_(x.narrow(dim, 2, n - 2) - x.narrow(dim, 0, n - 2)).mul_(0.5)
    g.narrow(dim, 0, 1).copy_(x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1))
    g.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1) - x.narrow(dim, n - 2, 1))
    return g


def jacobian_determinant(dvf_mm: torch.Tensor, spacing: Spacing, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Determinant of the Jacobian of ``p -> p + u(p)``, ``(B, 3, Z, Y, X)`` -> ``(B, Z, Y, X)`` (no autograd).

    Central differences inside, one-sided at the borders.  Values <= 0 mark folding.  Computed in ``dtype``
    (float64 by default; float32 is ~3x faster on a 50x256x256 grid, rounding error ~1e-6 for determinants of
    order 1) and returned in ``dvf_mm``'s dtype.
    """
    ddf = mm_to_voxels(dvf_mm.to(dtype), spacing)
    # j[c][d] = d(p_c + u_c)/d p_d in voxel units
    j = [[_difference(ddf[:, c], 1 + d) for d in range(3)] for c in range(3)]
    for c in range(3):
        j[c][c].add_(1.0)
    # det3's expression, evaluated in place (same numbers, a third of the temporaries)
    det = j[1][1] * j[2][2]
    det.sub_(j[1][2] * j[2][1]).mul_(j[0][0])
    det.sub_((j[1][0] * j[2][2]).sub_(j[1][2] * j[2][0]).mul_(j[0][1]))
    det.add_((j[1][0] * j[2][1]).sub_(j[1][1] * j[2][0]).mul_(j[0][2]))
    return det.to(dvf_mm.dtype)


def mm_to_voxel_gradient(spacing: Spacing, steps_vox: torch.Tensor) -> torch.Tensor:
    """Factors ``(3, 3, M)`` turning differences of mm displacement component ``c`` between points ``steps_vox[d]``
    voxels apart along axis ``d`` (``steps_vox`` ``(3, M)``) into derivatives ``d u_c / d p_d`` in voxels per voxel."""
    sp = torch.as_tensor(spacing, dtype=steps_vox.dtype, device=steps_vox.device)
    return 1.0 / (sp.view(3, 1, 1) * steps_vox.view(1, 3, -1))


def mm_to_normalized(index_scale: torch.Tensor, spacing: Spacing) -> torch.Tensor:
    """Factors turning mm along array axes ``(z, y, x)`` into ``grid_sample`` units along ``(x, y, z)``, for a grid
    whose normalised coordinate is ``index_scale * index + offset`` per axis (``index_scale`` ``(3,)`` z, y, x;
    see :func:`respmotion.core.geometry.level_to_normalized`)."""
    return (index_scale / torch.as_tensor(spacing, dtype=index_scale.dtype, device=index_scale.device)).flip(0)


def step_mm(spacing: Sequence[float], axes: Sequence[int]) -> float:
    """Product of the spacings (mm) of ``axes`` (0 = z, 1 = y, 2 = x; repeats allowed): divide a derivative taken
    per voxel along those axes by it to get it per mm (e.g. ``(c,)`` for a first, ``(a, b)`` for a second one)."""
    out = 1.0
    for a in axes:
        out *= float(spacing[a])
    return out


def folding_fraction(dvf_mm: torch.Tensor, spacing: Spacing, mask: torch.Tensor | None = None) -> float:
    """Fraction (0..1) of voxels with Jacobian determinant <= 0 (inside ``mask`` if given)."""
    det = jacobian_determinant(dvf_mm, spacing)
    if mask is not None:
        sel = mask.bool().expand_as(det)
        return float((det[sel] <= 0).float().mean()) if sel.any() else 0.0
    return float((det <= 0).float().mean())


def exp_velocity(velocity_mm: torch.Tensor, spacing: Spacing, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: displacement of the flow of a stationary velocity field.

    The result is a diffeomorphism (Jacobian > 0) when ``velocity / 2**steps`` is small.
    """
    u = velocity_mm / (2**steps)
    for _ in range(steps):
        u = compose(u, u, spacing)
    return u


def invert(dvf_mm: torch.Tensor, spacing: Spacing, iterations: int = 200, tol_mm: float = 1e-3) -> torch.Tensor:
    """Inverse ``v`` of a pull field ``u`` ``(B, 3, Z, Y, X)`` mm: ``compose(u, v) ~= 0`` (and ``compose(v, u) ~= 0``).

    ``p -> p + v(p)`` is the inverse map of ``p -> p + u(p)``: if ``u`` pulls image A into frame B, ``v`` pulls
    B back into A.  Fixed-point iteration ``v <- -u o (id + v)`` (what ``compose(u, v) = 0`` says), from
    ``v = -u``, until the largest change is below ``tol_mm`` or after ``iterations`` rounds; it converges
    where ``|grad u| < 1`` (no folding).  Sampling is trilinear with border padding (as :func:`compose`), so
    where ``p + v(p)`` leaves the grid the edge value of ``u`` is used.  Returns ``v`` in mm, same shape.
    """
    v = -dvf_mm
    for _ in range(iterations):
        v_new = -warp(dvf_mm, v, spacing, padding="border")
        done = float((v_new - v).abs().max()) < tol_mm
        v = v_new
        if done:
            break
    return v


#: HU range of the mass-preserving intensities (what a CT stores: air -1024 .. 12-bit bone 3071)
HU_RANGE = (-1024.0, 3071.0)


def mass_preserving_hu(hu: torch.Tensor, det_pull: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Lung intensities that keep the tissue's mass through a motion: ``HU' = (HU + 1000) * det_pull - 1000``.

    ``hu``: the image already pulled into the output frame (``hu(p) = moving(p + u(p))``); ``det_pull``: the
    Jacobian determinant of the pull map ``p -> p + u(p)`` at the same output voxels (:func:`jacobian_determinant`
    of the field the warp used).  ``det_pull`` is the inverse of the tissue's own volume change, so this is the
    law ``HU' = (HU + 1000) / det J - 1000`` with ``J`` the Jacobian of the tissue's (push) motion: a region
    squeezed to 92 % of its volume gets ``(HU + 1000) / 0.92``.  Density ``HU + 1000`` is taken proportional to
    mass per volume.  ``weight`` (0..1, e.g. the pulled lung occupancy) blends the law in (1) and keeps the
    warped HU (0); none = everywhere.  Folding (``det_pull <= 0``) counts as 0 (air); the law's values are clipped
    to :data:`HU_RANGE` (where ``weight`` is 0 the warped HU is kept as it is).  Any shapes that broadcast; float
    tensors.
    """
    det = torch.clamp(det_pull.to(hu.dtype), min=0.0)
    law = torch.clamp((hu + 1000.0) * det - 1000.0, *HU_RANGE)
    return law if weight is None else hu + weight.to(hu.dtype) * (law - hu)


def to_tensor(array: np.ndarray, device: str | torch.device = "cpu", dtype=torch.float32) -> torch.Tensor:
    """numpy ``(C, Z, Y, X)`` or ``(Z, Y, X)`` -> batched tensor ``(1, C, Z, Y, X)``."""
    t = torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)
    if t.ndim == 3:
        t = t[None]
    return t[None]


def upsample_field(field: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Trilinear upsampling of a field ``(B, C, Z, Y, X)`` by integer ``factor`` ``(fz, fy, fx)`` to
    ``(B, C, Z * fz, Y * fy, X * fx)``; values keep their units (mm stay mm: a displacement does not
    scale with the grid).

    Grid semantics: ``align_corners=False``, i.e. the coarse and fine grids cover the same field of
    view by their voxel *edges* (coarse voxel ``j`` covers fine voxels ``j * f .. (j + 1) * f - 1``,
    its centre at fine index ``j * f + (f - 1) / 2``), the mapping of :meth:`Geometry.resized` and
    :func:`respmotion.core.ops.resample_array`; beyond the outermost coarse centres the edge value is
    held.  Differentiable (used inside networks).
    """
    f = tuple(int(k) for k in factor)
    if len(f) != 3 or min(f) < 1:
        raise ValueError(f"upsampling factor must be three positive integers (z, y, x), got {tuple(factor)}")
    if f == (1, 1, 1):
        return field
    size = tuple(n * k for n, k in zip(field.shape[-3:], f))
    return F.interpolate(field, size=size, mode="trilinear", align_corners=False)
