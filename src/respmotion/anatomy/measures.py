"""Anatomy measures: where the lung base is and how far a motion field moves it (mm, + = superior).

Masks are :class:`~respmotion.core.types.Volume` (non-zero = lung) whose array z axis is the superior-inferior
axis (:meth:`~respmotion.core.geometry.Geometry.superior_sign`); fields are
:class:`~respmotion.core.types.DisplacementField` (``(3, z, y, x)`` mm, pull; fixed = the phase, moving = the
reference phase, normally 0 % end-inhale).

Diaphragm excursion (:func:`diaphragm_excursion`): the lung base is, for every (y, x) column of the reference
lung mask, its most inferior lung voxel (lowest LPS z).  Those points are moved into the target phase with the
inverse of the pull (how anatomy moves, :func:`respmotion.core.ops.move_world_points`), and the excursion is the
mean superior-inferior displacement of them, in mm along LPS +z: **positive = superior**.  From end-inhale (0 %)
to end-exhale (50 %) the diaphragm rises, so a healthy value is positive (about 10-20 mm).  Columns at the
lateral edge of the lung contribute their lowest voxel too, which may sit on the chest wall rather than the
dome.  :func:`lung_base_shift` is the same quantity measured from two masks instead of a field.

Use: ``diaphragm_excursion(lung_mask_00, field_50)["mean_mm"]``.
"""

from __future__ import annotations

import numpy as np

from ..core import ops
from ..core.types import DisplacementField, Volume


def _base_index(mask: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Per (y, x) column with lung: index z of the most inferior lung voxel; returns (column bool (y, x), z (y, x))."""
    m = mask.array != 0
    cols = m.any(axis=0)
    if not cols.any():
        raise ValueError("lung mask is empty")
    if mask.geometry.superior_sign() > 0:
        z = np.argmax(m, axis=0)  # first (lowest index = most inferior) lung voxel
    else:
        z = m.shape[0] - 1 - np.argmax(m[::-1], axis=0)
    return cols, z


def lung_base_points(mask: Volume) -> np.ndarray:
    """LPS mm ``(N, 3)`` of the most inferior lung voxel of every (y, x) column of ``mask``."""
    cols, z = _base_index(mask)
    y, x = np.nonzero(cols)
    return mask.geometry.index_to_world(np.stack([z[y, x], y, x], axis=1).astype(np.float64))


def diaphragm_excursion(ref_mask: Volume, field: DisplacementField) -> dict:
    """Mean superior-inferior motion (mm, + = superior) of the reference lung base under ``field`` (see module doc).

    ``ref_mask`` is the lung mask of the reference phase (moving frame of the pull field).
    Returns ``{"mean_mm", "median_mm", "p95_abs_mm", "n_columns"}``.
    """
    ref_mask.geometry.superior_sign()  # a grid without a superior-inferior z axis fails here, before any work
    base = lung_base_points(ref_mask)
    dz = ops.move_world_points(field, base)[:, 2] - base[:, 2]
    return {
        "mean_mm": float(dz.mean()),
        "median_mm": float(np.median(dz)),
        "p95_abs_mm": float(np.percentile(np.abs(dz), 95)),
        "n_columns": int(dz.size),
    }


def lung_base_shift(ref_mask: Volume, target_mask: Volume) -> dict:
    """Mean SI shift (mm, + = superior) of the lung base between two masks, over columns with lung in both.

    Per (y, x) column: LPS z of the target's most inferior lung voxel minus the reference's.  Resolution is one
    slice; ``{"mean_mm", "median_mm", "n_columns"}``.
    """
    if not ref_mask.geometry.same_as(target_mask.geometry):
        raise ValueError("reference and target masks must share one geometry")
    c0, z0 = _base_index(ref_mask)
    c1, z1 = _base_index(target_mask)
    both = c0 & c1
    if not both.any():
        raise ValueError("the two lung masks share no (y, x) column")
    dz = ref_mask.geometry.superior_mm(z1[both] - z0[both])
    return {"mean_mm": float(dz.mean()), "median_mm": float(np.median(dz)), "n_columns": int(both.sum())}
