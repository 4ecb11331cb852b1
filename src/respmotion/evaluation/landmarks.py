"""Landmark (target registration) error of a motion field, in mm.

Convention: the field ``u`` of phase k is a **pull** field whose *fixed* frame is the target phase k and whose
*moving* frame is the reference phase (e.g. 0 %): ``phase_k(p) = reference(p + u(p))``.  Landmarks are known at
the reference (``ref_points``) and at the target (``target_points``), all in LPS mm ``(N, 3)``.

The error used by default (``direction="move"``) is measured in the target frame: a reference landmark is moved
with the inverse of the pull (:func:`respmotion.core.ops.move_world_points`, i.e. solve ``q + u(q) = ref``) and
compared with its true target position, ``|q - target|``.  This is where the model says the anatomy goes.
``direction="pull"`` instead maps the true target points back, ``|target + u(target) - ref|`` (reference frame;
no inversion, the usual DIR-Lab style TRE).  Both agree to first order in the field gradient; a test checks
them on an analytic field.  ``field=None`` means "no motion": ``|target - ref|``.

Standard deviations are population (``ddof=0``), as in DIR-Lab's published figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..core import ops
from ..core.types import DisplacementField, Volume

DIRECTIONS = ("move", "pull")


def error_stats(errors_mm: np.ndarray) -> dict[str, float | int]:
    """``n``, ``mean``, ``sd`` (ddof 0), ``median``, ``p95``, ``max`` of per-point errors in mm."""
    e = np.asarray(errors_mm, dtype=np.float64).ravel()
    if e.size == 0:
        return {"n": 0}
    return {
        "n": int(e.size),
        "mean": float(e.mean()),
        "sd": float(e.std()),
        "median": float(np.median(e)),
        "p95": float(np.percentile(e, 95)),
        "max": float(e.max()),
    }


def points_in_mask(mask: Volume, points_xyz: np.ndarray) -> np.ndarray:
    """Bool ``(N,)``: the nearest voxel of ``mask`` to each LPS point is non-zero (False outside the grid)."""
    idx = np.rint(mask.geometry.world_to_index(np.asarray(points_xyz, dtype=np.float64))).astype(np.int64)
    shape = np.asarray(mask.geometry.shape)
    ok = np.all((idx >= 0) & (idx < shape), axis=1)
    inside = np.zeros(len(idx), dtype=bool)
    z, y, x = idx[ok].T
    inside[ok] = mask.array[z, y, x] != 0
    return inside


def _outside_grid(field: DisplacementField, points_xyz: np.ndarray) -> np.ndarray:
    """Bool ``(N,)``: points farther than half a voxel outside the field's grid (the field is border-padded)."""
    idx = field.geometry.world_to_index(points_xyz)
    hi = np.asarray(field.geometry.shape) - 0.5
    return np.any((idx < -0.5) | (idx > hi), axis=1)


@dataclass
class LandmarkErrors:
    """Per-point errors of one phase.

    ``errors_mm`` ``(N,)``; ``inside`` ``(N,)`` bool (reference landmark inside the lung mask) or ``None``;
    ``outside_grid`` ``(N,)`` bool (a landmark off the field's grid, evaluated with the border value).
    """

    errors_mm: np.ndarray
    inside: np.ndarray | None = None
    outside_grid: np.ndarray | None = None

    def summary(self) -> dict:
        """``{"all": stats, "inside": stats, "outside": stats, "n_outside_grid": int}`` (JSON-ready)."""
        out: dict = {"all": error_stats(self.errors_mm)}
        if self.inside is not None:
            out["inside"] = error_stats(self.errors_mm[self.inside])
            out["outside"] = error_stats(self.errors_mm[~self.inside])
        if self.outside_grid is not None:
            out["n_outside_grid"] = int(self.outside_grid.sum())
        return out


def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{name} must be (N, 3) LPS mm points, got shape {p.shape}")
    return p


def landmark_error(
    field: DisplacementField | None,
    ref_points_xyz: np.ndarray,
    target_points_xyz: np.ndarray,
    mask: Volume | None = None,
    direction: str = "move",
) -> LandmarkErrors:
    """Per-landmark error (mm) of ``field`` (pull, fixed = target phase, moving = reference); see module doc.

    ``mask`` (a lung mask of the reference phase) splits the points by whether the reference landmark lies in it.
    """
    ref = _as_points(ref_points_xyz, "ref_points_xyz")
    tgt = _as_points(target_points_xyz, "target_points_xyz")
    if ref.shape != tgt.shape:
        raise ValueError(f"reference and target landmarks differ in number: {len(ref)} vs {len(tgt)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    off_grid = None
    if field is None:
        err = np.linalg.norm(tgt - ref, axis=1)
    elif direction == "move":
        err = np.linalg.norm(ops.move_world_points(field, ref) - tgt, axis=1)
        off_grid = _outside_grid(field, ref) | _outside_grid(field, tgt)
    else:
        err = np.linalg.norm(ops.pull_world_points(field, tgt) - ref, axis=1)
        off_grid = _outside_grid(field, ref) | _outside_grid(field, tgt)
    inside = points_in_mask(mask, ref) if mask is not None else None
    return LandmarkErrors(err, inside, off_grid)


def landmark_report(
    ref_points_xyz: np.ndarray,
    targets: Mapping[int, np.ndarray],
    fields: Mapping[int, DisplacementField | None] | None = None,
    mask: Volume | None = None,
    direction: str = "move",
) -> dict:
    """Landmark error per phase, the field's next to "no motion" (JSON-ready).

    ``targets`` maps phase percent -> true landmark positions; ``fields`` maps phase percent -> pull field of that
    phase relative to the reference (phases missing from ``fields`` get only the no-motion row).  Returns
    ``{"units": "mm", "direction": ..., "phases": {"50": {"no_motion": summary, "field": summary}, ...}}`` with
    summaries from :meth:`LandmarkErrors.summary`.
    """
    fields = fields or {}
    phases: dict[str, dict] = {}
    for phase in sorted(targets):
        row = {"no_motion": landmark_error(None, ref_points_xyz, targets[phase], mask).summary()}
        if phase in fields:
            row["field"] = landmark_error(fields[phase], ref_points_xyz, targets[phase], mask, direction).summary()
        phases[str(int(phase))] = row
    return {"units": "mm", "direction": direction, "phases": phases}
