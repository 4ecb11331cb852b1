"""numpy-level operations on :class:`Volume` / :class:`DisplacementField` built on :mod:`.warp`."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import warp as W
from .types import DisplacementField, Volume


def warp_volume(volume: Volume, field: DisplacementField, mode: str = "bilinear") -> Volume:
    """Pull ``volume`` through ``field`` (both on the same geometry); see :func:`warp.warp`."""
    if not volume.geometry.same_as(field.geometry):
        raise ValueError("volume and displacement field must share one geometry")
    img = W.to_tensor(volume.array.astype(np.float32))
    out = W.warp(img, W.to_tensor(field.array), field.geometry.spacing, mode=mode)
    arr = out[0, 0].numpy()
    if mode == "nearest":
        arr = arr.astype(volume.array.dtype)
    return Volume(arr, volume.geometry, dict(volume.meta))


def _points_through(step, field: DisplacementField, points_xyz: np.ndarray) -> np.ndarray:
    """LPS points -> voxel indices -> ``step(field (3, z, y, x) float64, indices, spacing)`` -> LPS points."""
    g = field.geometry
    idx = torch.as_tensor(g.world_to_index(points_xyz), dtype=torch.float64)
    return g.index_to_world(step(torch.as_tensor(field.array, dtype=torch.float64), idx, g.spacing).numpy())


def move_world_points(field: DisplacementField, points_xyz: np.ndarray) -> np.ndarray:
    """Move LPS points of the moving (reference) image into the fixed frame (inverse of the pull)."""
    return _points_through(W.move_points, field, points_xyz)


def pull_world_points(field: DisplacementField, points_xyz: np.ndarray) -> np.ndarray:
    """``p + u(p)`` for LPS points ``p`` of the fixed frame (where they come from in the moving image)."""
    return _points_through(W.pull_points, field, points_xyz)


def jacobian_determinant(field: DisplacementField) -> np.ndarray:
    """Jacobian determinant ``(z, y, x)`` of ``p -> p + u(p)`` in float64 (:func:`warp.jacobian_determinant`)."""
    return W.jacobian_determinant(W.to_tensor(field.array, dtype=torch.float64), field.geometry.spacing)[0].numpy()


def resample_array(
    array: np.ndarray, shape: Sequence[int], order: int = 1, antialias: bool = True
) -> np.ndarray:
    """Resample ``(z, y, x)`` or ``(C, z, y, x)`` to ``shape`` keeping the field of view
    (voxel edges), the mapping of :meth:`Geometry.resized`.  Linear (``order=1``) or nearest
    (``order=0``); a Gaussian pre-filter (sigma = (factor - 1) / 2 voxels) limits aliasing when
    shrinking.
    """
    shape = tuple(int(s) for s in shape)
    arr = np.asarray(array)
    chan = arr.ndim == 4
    src = arr if chan else arr[None]
    factors = np.asarray(src.shape[1:], dtype=float) / np.asarray(shape, dtype=float)
    x = src.astype(np.float32)
    if order == 1 and antialias and np.any(factors > 1.0):
        sig = [0.0] + [max(0.0, (f - 1.0) / 2.0) for f in factors]
        x = ndimage.gaussian_filter(x, sigma=sig, mode="nearest")
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    if order == 0:
        out = F.interpolate(t, size=shape, mode="nearest-exact")
    else:
        out = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    res = out[0].numpy()
    if order == 0:
        res = res.astype(arr.dtype)
    return res if chan else res[0]


def resample_volume(volume: Volume, shape: Sequence[int], order: int = 1) -> Volume:
    """Same field of view on ``shape`` voxels (geometry from :meth:`Geometry.resized`)."""
    return Volume(resample_array(volume.array, shape, order), volume.geometry.resized(shape), dict(volume.meta))


def resample_field(field: DisplacementField, shape: Sequence[int]) -> DisplacementField:
    """Resample a field to ``shape``; values stay in mm."""
    return DisplacementField(resample_array(field.array, shape, 1), field.geometry.resized(shape), dict(field.meta))

