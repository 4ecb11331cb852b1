"""The region of a CT that slides against the chest wall when it breathes (the inside field of sliding registration).

* :func:`sliding_mask`: the thoracic cavity around a lung mask -- per axial slice the filled convex hull of the
  lung cross-sections at and above it (lungs, mediastinum, and below the lungs the upper abdomen that follows
  the diaphragm), without the bone inside it;
* :func:`sliding_region`: that region (``"cavity"``) or the lung mask alone (``"lung"``) straight from a CT in HU.

Masks are uint8 ``(z, y, x)`` on the CT's grid.  Registration blends its inside and outside fields with a weight
made from this region (:func:`respmotion.registration.bspline.blend_weight`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ..core.geometry import Geometry
from ..core.grid import ball
from .masks import LUNG_THRESHOLD_HU, lung_mask

REGIONS = ("cavity", "lung")


def _fill_hull(mask2d: np.ndarray) -> np.ndarray:
    """Filled convex hull of a 2-D boolean mask (the mask itself when its points span no area)."""
    from scipy.spatial import ConvexHull, QhullError

    pts = np.argwhere(mask2d)
    if len(pts) < 3:
        return mask2d.copy()
    try:
        eq = ConvexHull(pts).equations  # (facets, 3): normal . p + offset <= 0 inside
    except QhullError:  # collinear points: no area to fill
        return mask2d.copy()
    lo, hi = pts.min(0), pts.max(0) + 1
    grid = np.stack(np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij"), -1).reshape(-1, 2)
    inside = (grid @ eq[:, :2].T + eq[:, 2] <= 1e-9).all(1)
    out = mask2d.copy()
    out[lo[0]:hi[0], lo[1]:hi[1]] |= inside.reshape(hi[0] - lo[0], hi[1] - lo[1])
    return out


def sliding_mask(lung: np.ndarray, superior: float = 1.0, hu: np.ndarray | None = None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), bone_hu: float = 150.0,
                 bone_margin_mm: float = 5.0) -> np.ndarray:
    """Thoracic cavity around a lung mask ``(z, y, x)``: per axial slice the filled convex hull of the lung
    cross-sections at and above that slice (lungs and mediastinum, and below the lungs the upper abdomen inside
    the rib cage's footprint).

    ``superior`` is +1 when array z increases towards superior (:meth:`respmotion.core.Geometry.superior_sign`).
    With the CT ``hu`` ``(z, y, x)``, bone inside the hull (above ``bone_hu``: the vertebral bodies, which do not
    move) and ``bone_margin_mm`` around it (in-plane, ``spacing`` mm (z, y, x)) are left out; the lungs
    themselves always stay in.  Returns uint8 ``(z, y, x)``.
    """
    lung = np.asarray(lung) > 0
    out = np.zeros(lung.shape, bool)
    acc = np.zeros(lung.shape[1:], bool)
    order = range(lung.shape[0] - 1, -1, -1) if superior > 0 else range(lung.shape[0])
    for k in order:
        acc |= lung[k]
        if acc.any():
            out[k] = _fill_hull(acc)
    if hu is not None:
        bone = out & (np.asarray(hu) > bone_hu)
        disk = ball(spacing[1:], bone_margin_mm, min_half_width=1)[None]  # in-plane
        out &= ~ndimage.binary_dilation(bone, structure=disk)
        out |= lung
    return out.astype(np.uint8)


def sliding_region(hu: np.ndarray, body: np.ndarray, geometry: Geometry, region: str = "cavity",
                   lung_threshold_hu: float = LUNG_THRESHOLD_HU) -> np.ndarray:
    """The region of the CT ``hu`` ``(z, y, x)`` whose tissue slides against the chest wall, uint8 ``(z, y, x)``:
    the HU-threshold lung mask inside ``body`` (:func:`~respmotion.anatomy.lung_mask`, ``lung_threshold_hu``)
    for ``region="lung"``, or the thoracic cavity around it (``"cavity"``, :func:`sliding_mask`, with
    ``geometry``'s spacing and superior axis)."""
    if region not in REGIONS:
        raise ValueError(f"sliding region must be one of {', '.join(REGIONS)}, got {region!r}")
    lung = lung_mask(hu, body, lung_threshold_hu)
    if region == "lung":
        return lung
    return sliding_mask(lung, geometry.superior_sign(), hu, geometry.spacing)
