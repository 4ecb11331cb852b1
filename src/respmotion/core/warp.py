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


def voxels_to_mm(dvf_vox: torch.Tensor, spacing: Spacing) -> torch.Tensor:
    return dvf_vox * _spacing_tensor(spacing, dvf_vox)


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


def jacobian_determinant(dvf_mm: torch.Tensor, spacing: Spacing) -> torch.Tensor:
    """Determinant of the Jacobian of ``p -> p + u(p)``, ``(B, 3, Z, Y, X)`` -> ``(B, Z, Y, X)``.

    Central differences inside, one-sided at the borders (``torch.gradient``).  Values <= 0
    mark folding.
    """
    ddf = mm_to_voxels(dvf_mm.double(), spacing)
    # j[c][d] = d(p_c + u_c)/d p_d in voxel units; explicit 3x3 determinant (cheaper than linalg.det)
    j = [list(torch.gradient(ddf[:, c], dim=(1, 2, 3))) for c in range(3)]
    for c in range(3):
        j[c][c] = j[c][c] + 1.0
    det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
           - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
           + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    return det.to(dvf_mm.dtype)


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


def to_tensor(array: np.ndarray, device: str | torch.device = "cpu", dtype=torch.float32) -> torch.Tensor:
    """numpy ``(C, Z, Y, X)`` or ``(Z, Y, X)`` -> batched tensor ``(1, C, Z, Y, X)``."""
    t = torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)
    if t.ndim == 3:
        t = t[None]
    return t[None]
