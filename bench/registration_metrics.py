"""Registration bench metrics: accuracy of a pull field against a case's truth, and the acceptance of ours against
a deepali baseline pair by pair."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from respmotion.core import DisplacementField
from respmotion.core import warp as W
from respmotion.evaluation.landmarks import landmark_error

from .registration_cases import Case

BANDS_MM = (5.0, 15.0)  # landmark bins by distance to the lung boundary: < 5, 5-15, > 15 mm


def _signed_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Signed distance (mm) to the mask's boundary: > 0 outside, < 0 inside."""
    return (ndimage.distance_transform_edt(~mask, sampling=spacing)
            - ndimage.distance_transform_edt(mask, sampling=spacing))


def _bands(err: np.ndarray, dist: np.ndarray) -> dict[str, Any]:
    lo, hi = BANDS_MM
    out = {}
    for side, sel in (("inside", dist < 0), ("outside", dist >= 0)):
        a = np.abs(dist)
        for label, band in ((f"<{lo:g}", a < lo), (f"{lo:g}-{hi:g}", (a >= lo) & (a <= hi)), (f">{hi:g}", a > hi)):
            m = sel & band
            out[f"{side}_{label}mm"] = {"n": int(m.sum()), "tre_mm": float(err[m].mean()) if m.any() else None}
    return out


def metrics(u: np.ndarray, case: Case) -> dict[str, Any]:
    """Accuracy of the pull field ``u`` ``(3, z, y, x)`` mm on ``case``."""
    err = np.linalg.norm(u - case.gt, axis=0)[case.lung]
    le = landmark_error(DisplacementField(u.astype(np.float32), case.geom), case.ref, case.tgt).errors_mm
    sd = _signed_distance(case.lung, case.geom.spacing)
    ix = np.clip(np.rint(case.geom.world_to_index(case.tgt)).astype(int), 0, np.array(case.geom.shape) - 1)
    dist = sd[ix[:, 0], ix[:, 1], ix[:, 2]]
    inside = case.in_lung
    return {
        "lung_error_mean_mm": float(err.mean()), "lung_error_p95_mm": float(np.percentile(err, 95)),
        "landmark_error_mm": float(le.mean()), "landmark_error_p95_mm": float(np.percentile(le, 95)),
        "landmark_error_sd_mm": float(le.std()),
        "landmark_error_inside_mm": float(le[inside].mean()),
        "landmark_error_outside_mm": float(le[~inside].mean()) if (~inside).any() else None,
        "landmarks_n": int(len(le)), "landmarks_inside_n": int(inside.sum()),
        "tre_by_boundary_distance": _bands(le, dist),
        "folding_percent": 100.0 * W.folding_fraction(torch.as_tensor(u)[None], case.geom.spacing),
    }


def acceptance(ours: dict, deepali: dict) -> dict[str, Any]:
    """Per pair: ours <= deepali in lung error mean and p95, landmark TRE and every distance band; 0 % folding;
    ours' median time <= 0.25 x deepali's."""
    per = {}
    for name, o in ours.items():
        d = deepali[name]
        bands = {b: (v["tre_mm"] is None or v["tre_mm"] <= d["tre_by_boundary_distance"][b]["tre_mm"])
                 for b, v in o["tre_by_boundary_distance"].items()}
        per[name] = {"lung_mean": o["lung_error_mean_mm"] <= d["lung_error_mean_mm"],
                     "lung_p95": o["lung_error_p95_mm"] <= d["lung_error_p95_mm"],
                     "tre": o["landmark_error_mm"] <= d["landmark_error_mm"], "bands": all(bands.values()),
                     "bands_failed": [b for b, ok in bands.items() if not ok],
                     "folding_zero": o["folding_percent"] == 0.0,
                     "time_ratio": o["seconds"] / d["seconds"], "time": o["seconds"] <= 0.25 * d["seconds"],
                     "cpu_time_ratio": o["cpu_seconds"] / d["cpu_seconds"] if d.get("cpu_seconds") else None}
    flags = ("lung_mean", "lung_p95", "tre", "bands", "folding_zero", "time")
    return {"pairs": per, "all": {f: all(p[f] for p in per.values()) for f in flags}}
