"""Per-axis arithmetic of regular grids in numpy: voxel counts <-> mm, voxel centres along one axis,
positions along an axis -> indices or ``grid_sample`` coordinates, and neighbourhoods of a radius in mm.

The world mapping of a whole volume (origin, direction, LPS) is :class:`respmotion.core.geometry.Geometry`'s;
these helpers serve code that works along the array axes ``(z, y, x)`` of one grid, in mm from a point of
that grid (masks, analytic phantoms, plots).  Spacings are mm per voxel, in the order of the axes they are
given for.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def to_mm(voxels, spacing):
    """Lengths in voxels -> mm: ``voxels * spacing`` per axis (scalars or sequences, broadcast as numpy)."""
    return np.multiply(voxels, spacing)


def to_voxels(mm, spacing):
    """Lengths in mm -> voxels (fractional): ``mm / spacing`` per axis (scalars or sequences, broadcast)."""
    return np.divide(mm, spacing)


def centres_from_edge(n: int, step: float, edge: float = 0.0) -> np.ndarray:
    """Positions (mm) of the centres of ``n`` voxels of ``step`` mm along one axis whose first voxel starts
    (its outer edge) at ``edge`` mm: ``edge + step * (i + 0.5)``."""
    return edge + step * (np.arange(n) + 0.5)


def axis_index(mm, first: float, step: float):
    """Positions (mm) along a regular axis whose voxel 0 is centred at ``first`` -> continuous voxel index."""
    return (mm - first) / step


def axis_to_normalized_(mm: torch.Tensor, first: float, step: float, n: int) -> torch.Tensor:
    """Positions (mm) along a regular axis of ``n`` voxels centred at ``first + step * i`` -> ``grid_sample``
    coordinates (``align_corners=True``: voxel 0 -> -1, voxel n-1 -> +1), **in place** on ``mm`` (so that a
    float32 tensor of a whole volume needs no second copy); returns ``mm``."""
    return mm.sub_(float(first)).mul_(2.0 / (float(step) * (n - 1))).sub_(1.0)


def ball(spacing: Sequence[float], radius_mm: float, min_half_width: int = 0) -> np.ndarray:
    """Boolean structuring element of the voxels within ``radius_mm`` of the centre voxel, on a grid of
    ``spacing`` mm (one entry per axis: 3 for a ball, 2 for an in-plane disk).  Half width per axis
    ``max(min_half_width, round(radius_mm / spacing))`` voxels; shape ``2 * half width + 1`` per axis."""
    half = [max(min_half_width, int(round(radius_mm / s))) for s in spacing]
    offsets = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist2 = sum((o * s) ** 2 for o, s in zip(offsets, spacing))
    return dist2 <= radius_mm * radius_mm
