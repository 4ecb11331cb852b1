"""Normalised lung coordinates and motion regions of a CT: where a population breathing model applies.

A CT's own anatomy defines the frame, so the same model fits a CT of any size, position or habitus:

* :func:`lung_box`: the lung's extent (per LPS axis the :data:`EXTENT_PERCENTILES` of the lung voxels or,
  for landmark data, of the landmarks);
* :func:`normalised`: LPS points -> ``(n_si, n_ap, n_ml)`` in [0, 1] (apex 0 -> base 1, anterior 0 ->
  posterior 1, medial 0 -> lateral 1 as ``|x - centre| / half width``);
* :func:`motion_regions`: per voxel the fraction of the lung motion it takes: 1 in the lungs, a Gaussian
  decay below each lung column (liver/stomach follow the diaphragm), :data:`MEDIASTINUM_WEIGHT` between the
  lungs (heart, great vessels), 0 in bone outside the lungs (vertebrae, ribs, sternum: filled and dilated by
  :data:`BONE_MARGIN_MM`), in the chest wall and outside the body.  The lungs slide along the chest wall: the
  weight jumps from 1 to 0 there.

Arrays are ``(z, y, x)``; points LPS mm ``(x, y, z)``; weights are float32 in [0, 1].
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..core.geometry import Geometry
from ..core.grid import ball
from .masks import LUNG_THRESHOLD_HU, body_mask, lung_mask

EXTENT_PERCENTILES = (1.0, 99.0)
MEDIASTINUM_WEIGHT = 0.3
ABDOMEN_DECAY_MM = 60.0
BONE_HU = 180.0
BONE_MARGIN_MM = 4.0


def lung_box(points_xyz: np.ndarray) -> dict[str, list[float]]:
    """Extent ``{"lo": [x, y, z], "hi": [x, y, z]}`` mm of a point cloud: per axis the :data:`EXTENT_PERCENTILES`."""
    pts = np.asarray(points_xyz, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < 2:
        raise ValueError(f"lung_box needs (N >= 2, 3) points, got shape {pts.shape}")
    lo, hi = np.percentile(pts, EXTENT_PERCENTILES, axis=0)
    if np.any(hi - lo <= 0):
        raise ValueError("lung_box: the points span no volume")
    return {"lo": lo.tolist(), "hi": hi.tolist()}


def normalised(points_xyz: np.ndarray, box: dict[str, list[float]], inferior_axis_sign: float = -1.0) -> np.ndarray:
    """``(N, 3)`` points (x, y, z mm) -> ``(N, 3)`` ``(n_si, n_ap, n_ml)`` in the box, clipped to [0, 1].

    ``inferior_axis_sign``: -1 when the z coordinate grows superiorly (LPS, the default), +1 when it grows
    inferiorly (DIR-Lab slice indices).  ``n_ap`` grows towards +y (posterior)."""
    lo, hi = np.asarray(box["lo"]), np.asarray(box["hi"])
    p = np.asarray(points_xyz, dtype=np.float64)
    z = (p[:, 2] - lo[2]) / (hi[2] - lo[2])
    n_si = z if inferior_axis_sign > 0 else 1.0 - z
    n_ap = (p[:, 1] - lo[1]) / (hi[1] - lo[1])
    n_ml = np.abs(p[:, 0] - 0.5 * (lo[0] + hi[0])) / (0.5 * (hi[0] - lo[0]))
    return np.clip(np.stack([n_si, n_ap, n_ml], 1), 0.0, 1.0)


def lateral_sign(points_xyz: np.ndarray, box: dict[str, list[float]]) -> np.ndarray:
    """+1 on the box's patient-left half (LPS +x), -1 on the right: lateral = ``sign * x``."""
    centre = 0.5 * (box["lo"][0] + box["hi"][0])
    return np.where(np.asarray(points_xyz)[:, 0] >= centre, 1.0, -1.0)


def voxel_points(geometry: Geometry, mask: np.ndarray | None = None) -> np.ndarray:
    """LPS mm ``(N, 3)`` of the voxel centres (of ``mask`` != 0 when given, in C order)."""
    idx = np.argwhere(mask != 0) if mask is not None else np.indices(geometry.shape).reshape(3, -1).T
    return geometry.index_to_world(idx.astype(np.float64))


def bone_mask(hu: np.ndarray, body: np.ndarray, spacing) -> np.ndarray:
    """Bone (HU > :data:`BONE_HU` inside the body, holes such as the spinal canal filled slice by slice),
    dilated by :data:`BONE_MARGIN_MM`; bool ``(z, y, x)``."""
    bone = (hu > BONE_HU) & (body != 0)
    bone = np.stack([ndimage.binary_fill_holes(b) for b in bone])
    return ndimage.binary_dilation(bone, structure=ball(spacing, BONE_MARGIN_MM))


def motion_regions(hu: np.ndarray, geometry: Geometry, lung: np.ndarray | None = None,
                   body: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Lung/body/bone masks and the motion weight map of a CT ``(z, y, x)`` HU (module doc).

    The array z axis must be the superior-inferior axis (:meth:`Geometry.superior_sign`).
    Returns ``{"lung", "body", "bone": bool, "weight": float32}``, all ``(z, y, x)``."""
    if hu.shape != tuple(geometry.shape):
        raise ValueError(f"CT shape {hu.shape} differs from its geometry {geometry.shape}")
    sup = geometry.superior_sign()
    body = (body_mask(hu) if body is None else body) != 0
    lung = (lung_mask(hu, body.astype(np.uint8)) if lung is None else lung) != 0
    if not lung.any():
        raise ValueError(f"no lung found in the CT (HU below {LUNG_THRESHOLD_HU:g} inside the body)")
    bone = bone_mask(hu, body, geometry.spacing)
    weight = lung.astype(np.float32)
    # below the lung base of every column: Gaussian decay with the distance (mm) below the lowest lung voxel
    nz = hu.shape[0]
    k = np.arange(nz)[:, None, None]
    has = lung.any(0)
    lowest = np.where(sup > 0, np.argmax(lung, 0), nz - 1 - np.argmax(lung[::-1], 0))
    below_mm = geometry.superior_mm(lowest[None] - k)  # > 0 inferior of the base
    abd = np.exp(-(np.maximum(below_mm, 0.0) / ABDOMEN_DECAY_MM) ** 2).astype(np.float32)
    weight = np.where(has[None] & (below_mm > 0) & body, abd, weight)
    # mediastinum: between the two lungs' left-right extent in each row, not lung
    left = np.maximum.accumulate(lung, axis=2)
    right = np.maximum.accumulate(lung[:, :, ::-1], axis=2)[:, :, ::-1]
    between = left & right & ~lung & body
    weight = np.where(between & (weight == 0), np.float32(MEDIASTINUM_WEIGHT), weight)
    weight[(bone & ~lung) | ~body] = 0.0
    return {"lung": lung, "body": body, "bone": bone, "weight": weight.astype(np.float32)}
