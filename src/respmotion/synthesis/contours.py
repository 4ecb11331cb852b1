"""Carry a structure (e.g. a GTV) drawn on the reference CT through the breathing cycle; its motion and ITV.

Direction.  The phase-k field ``u_k`` (pull, on the phase-k grid) says where the content of
phase-k voxel ``p`` comes from in the reference: ``phase_k(p) = ref(p + u_k(p))``.  A structure
is anatomy, so the phase-k voxel ``p`` belongs to it exactly when the reference point it shows,
``p + u_k(p)``, does: ``mask_k(p) = mask_ref(p + u_k(p))``.  That is *pulling* the reference mask
with ``u_k`` -- the same motion as moving the structure's contour points with the inverse map
(:func:`respmotion.core.ops.move_world_points`), but expressed directly on the target grid, with
no inversion and no polygon re-rasterisation.  (Pushing the mask with ``u_k``, or pulling with
``-u_k``, would move it the wrong way or only approximately.)  The mask is pulled trilinearly as
0/1 floats and thresholded at 0.5 (partial volume at the edge decides by majority).

Motion summary (:func:`structure_motion`): per phase the centroid of the mask voxels in LPS mm
(``Geometry.index_to_world`` of the mean voxel index) and the volume in cm3; the peak-to-peak
motion per LPS axis (max - min of the centroid over phases; x = left-right, y = anterior-posterior,
z = superior-inferior); the ITV = union of the phase masks, with its volume in cm3.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..core import ops
from ..core.geometry import Geometry
from ..core.types import DisplacementField, Volume


def propagate_structure(
    mask_ref: np.ndarray | Volume, fields: Mapping[int, DisplacementField], threshold: float | None = 0.5
) -> dict[int, np.ndarray]:
    """Reference mask ``(z, y, x)`` -> ``{phase: mask (z, y, x)}`` pulled with each phase's field.

    ``fields[k]`` is the pull field of phase k relative to the reference (``(3, z, y, x)`` mm on the
    phase grid = the reference grid).  See the module docstring for why pulling is the right direction.
    ``mask_ref`` is binary (non-zero = inside) or a partial-volume occupancy in [0, 1].  With a
    ``threshold`` the result is a uint8 mask (occupancy >= threshold); with ``None`` it is the
    pulled occupancy (float32 in [0, 1]), whose weighted centroid follows sub-voxel motion
    (trilinear interpolation keeps the first moment), which binary masks of small structures do not.
    """
    arr = mask_ref.array if isinstance(mask_ref, Volume) else np.asarray(mask_ref)
    occ = arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) else (arr != 0).astype(np.float32)
    if occ.size and (occ.min() < 0 or occ.max() > 1):
        raise ValueError("a fractional mask must hold occupancies in [0, 1]")
    if not fields:
        raise ValueError("no phase fields to propagate the structure with")
    out: dict[int, np.ndarray] = {}
    for k, f in sorted(fields.items()):
        if tuple(arr.shape) != f.geometry.shape:
            raise ValueError(f"mask shape {arr.shape} != field shape {f.geometry.shape} (phase {k})")
        soft = ops.warp_volume(Volume(occ, f.geometry), f).array
        out[int(k)] = np.clip(soft, 0.0, 1.0) if threshold is None else (soft >= threshold).astype(np.uint8)
    return out


def _occupancy(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    return m.astype(np.float64) if np.issubdtype(m.dtype, np.floating) else (m != 0).astype(np.float64)


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Slices of the smallest box holding every non-zero voxel of ``mask`` ``(z, y, x)``; None when empty."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(mask != 0, axis=tuple(a for a in range(3) if a != axis)))
        if not hit.size:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _weighted_mean_index(w: np.ndarray) -> np.ndarray:
    """Occupancy-weighted mean voxel index ``(z, y, x)`` of ``w`` (float64, total > 0)."""
    total = w.sum()
    if total <= 0:
        raise ValueError("structure mask is empty")
    return np.array([(w.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(w.shape[axis])).sum() / total
                     for axis in range(3)])


class MotionAccumulator:
    """:func:`structure_motion` one phase at a time (a streaming synthesis holds one phase's mask).

    ``add(k, mask)`` per phase (binary or occupancy ``(z, y, x)``), then ``result()``; memory: the
    uint8 ITV and a few numbers per phase.
    """

    def __init__(self, geometry: Geometry, itv_threshold: float = 0.5) -> None:
        self.geometry, self.itv_threshold = geometry, itv_threshold
        self.voxel_cm3 = geometry.voxel_volume_mm3() / 1000.0
        self.phases: dict[int, dict[str, Any]] = {}
        self.itv = np.zeros(geometry.shape, dtype=bool)

    def add(self, k: int, mask: np.ndarray) -> None:
        m = np.asarray(mask)
        if m.shape != self.geometry.shape:
            raise ValueError(f"phase {k} mask shape {m.shape} != geometry shape {self.geometry.shape}")
        box = _bounding_box(m)
        if box is None:
            raise ValueError(f"structure is empty at phase {k}")
        w = _occupancy(m[box])  # the structure's box only: a small structure on a large CT costs little
        origin = np.array([b.start for b in box], dtype=np.float64)
        c = self.geometry.index_to_world(_weighted_mean_index(w) + origin)
        self.phases[int(k)] = {"centroid_lps_mm": [float(v) for v in c], "volume_cm3": float(w.sum() * self.voxel_cm3)}
        self.itv[box] |= w >= self.itv_threshold

    def result(self) -> dict[str, Any]:
        if not self.phases:
            raise ValueError("no phase masks")
        phases = dict(sorted(self.phases.items()))
        cents_a = np.asarray([rec["centroid_lps_mm"] for rec in phases.values()])
        ptp = cents_a.max(0) - cents_a.min(0)
        pair = np.linalg.norm(cents_a[:, None] - cents_a[None], axis=-1)
        return {
            "phases": phases,
            "peak_to_peak_mm": {"x_lr": float(ptp[0]), "y_ap": float(ptp[1]), "z_si": float(ptp[2]),
                                "vector_max": float(pair.max())},
            "itv_volume_cm3": float(self.itv.sum() * self.voxel_cm3),
            "itv": self.itv.astype(np.uint8),
        }


def structure_motion(
    masks_by_phase: Mapping[int, np.ndarray], geometry: Geometry, itv_threshold: float = 0.5
) -> dict[str, Any]:
    """Per-phase centroid/volume, peak-to-peak motion per axis and the ITV of a structure.

    ``masks_by_phase`` holds binary masks or occupancies in [0, 1] (``propagate_structure(...,
    threshold=None)``); centroids and volumes are occupancy-weighted, the ITV is the union of the
    voxels with occupancy >= ``itv_threshold`` (for binary masks: the union of the masks).
    Returns ``{"phases": {k: {"centroid_lps_mm": [x, y, z], "volume_cm3"}},
    "peak_to_peak_mm": {"x_lr", "y_ap", "z_si", "vector_max"}, "itv_volume_cm3", "itv"}``;
    ``"itv"`` is the uint8 union mask ``(z, y, x)`` (drop it for a JSON summary:
    :func:`motion_summary`).  ``vector_max`` is the largest centroid distance between two phases.
    """
    if not masks_by_phase:
        raise ValueError("no phase masks")
    acc = MotionAccumulator(geometry, itv_threshold)
    for k, m in sorted(masks_by_phase.items()):
        acc.add(k, m)
    return acc.result()


def motion_summary(motion: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able part of :func:`structure_motion`'s result (everything but the ITV mask)."""
    return {k: v for k, v in motion.items() if k != "itv"}
