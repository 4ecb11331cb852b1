"""What a phantom patient's motion is, in the terms the rest of the toolkit measures: landmark positions in every
phase (:func:`landmark_table`, the ``landmarks.json`` of a phantom study) and motion statistics comparable with the
measured reference (:func:`motion_statistics`, ``respmotion.data.motion_reference_fit``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...anatomy.lung_frame import lateral_sign, lung_box, normalised
from ...io.layout import PHASES
from ..motion_reference import profile_table
from .params import FOV_MM, SPINE_R, SPINE_STATIC_R, SPINE_Y
from .patient import Phantom


def landmark_table(ph: Phantom) -> dict[str, Any]:
    """Landmark positions (LPS mm) in every phase; kinds: nodule, vessel_bifurcation, chest_wall,
    lung_parenchyma, below_diaphragm.  Kept are the landmarks that stay 3 mm inside the field of view
    and farther than :meth:`Phantom.landmark_margin` from the sliding interface (and from the edge of the static
    spine zone) in every phase, so that the stored fields move every stored landmark to its true position
    (to < 0.1 mm).  Positions are ``(x, y, z)`` lists per phase (``"phases"``, keys ``"00"``...)."""
    a = ph.anatomy
    ref = np.array(a.landmarks_ref)  # (N, 3) z,y,x mm == LPS (z, y, x) for identity direction
    fov_lo = np.array(ph.geometry.index_to_world([0, 0, 0]))[::-1]
    fov_hi = np.array(ph.geometry.index_to_world(np.array(ph.geometry.shape) - 1))[::-1]
    margin = ph.landmark_margin()
    per_phase = {}
    keep = np.ones(len(ref), bool)
    dist = ph.p.sliding_distance(ref[:, 1], ref[:, 2])
    for k in PHASES:
        q = ph.move_points(k, ref)
        keep &= np.all((q >= fov_lo + 3.0) & (q <= fov_hi - 3.0), axis=1)
        keep &= np.abs(ph.p.sliding_distance(q[:, 1], q[:, 2])) > margin
        spine_r = np.sqrt(q[:, 2] ** 2 + (q[:, 1] - SPINE_Y * ph.p.body_ay) ** 2)
        keep &= np.abs(spine_r - SPINE_STATIC_R) > margin  # the static spine's edge is a second interface
        per_phase[f"{k:02d}"] = q
    kinds = [k for k, m in zip(a.landmark_kind, keep) if m]
    return {
        "frame": "LPS mm (x, y, z)",
        "kind": kinds,
        "sliding_distance_mm": dist[keep].round(3).tolist(),  # signed distance to the rib cage, < 0 inside
        "sliding_width_mm": ph.p.slide_width,
        "sliding_margin_mm": round(margin, 3),
        "in_lung": [bool(a.inside_lung(c)) for c, m in zip(ref, keep) if m],
        "phases": {k: v[keep][:, ::-1].round(6).tolist() for k, v in per_phase.items()},
    }


def motion_statistics(ph: Phantom) -> dict[str, Any]:
    """This patient's motion in the terms of the measured reference (``motion_reference``), on its uniform
    lung points (the ``lung_parenchyma`` landmarks, like DIR-Lab's evenly spread landmarks): amplitude (mean
    superior motion at 50 %, mm), mean (superior, posterior, lateral) mm, profiles per unit amplitude over the
    normalised lung position, the superior state per phase, the largest motion (mm) in the spine, the phase
    curve (end-exhale phase, exponent) and the hysteresis loop: the largest in-plane distance (mm) between a
    point's exhale and inhale positions at the same SI state (exhale phases 5 %, 10 %, ... before the peak)."""
    a = ph.anatomy
    ref = np.array([c for c, k in zip(a.landmarks_ref, a.landmark_kind) if k == "lung_parenchyma"])
    xyz = ref[:, ::-1]
    box = lung_box(xyz)
    d = ph.move_points(50, ref) - ref  # z (superior), y (posterior), x (left) mm
    comp = np.stack([d[:, 0], d[:, 1], d[:, 2] * lateral_sign(xyz, box)], 1)
    amp = float(comp[:, 0].mean())
    states = {f"{k:02d}": float((ph.move_points(k, ref)[:, 0] - ref[:, 0]).mean()) / amp for k in PHASES}
    p = ph.p
    zz = np.linspace(-FOV_MM[0] / 2, FOV_MM[0] / 2, 16)
    ang, rad = np.meshgrid(np.linspace(0, 2 * math.pi, 12), np.linspace(0, SPINE_R, 5))  # the vertebral body
    sy, sx = SPINE_Y * p.body_ay + rad * np.sin(ang), rad * np.cos(ang)
    spine = ph.displacement(50, zz[:, None, None], sy[None], sx[None])
    loop = max(float(np.linalg.norm((ph.move_points(k, ref) - ph.move_points(ph.curve.same_si_state(k), ref)
                                     )[:, 1:], axis=1).max())
               for k in np.arange(5.0, 100.0 * ph.curve.peak, 5.0))
    return {"amplitude_mm": amp, "component_mean_mm": comp.mean(0).tolist(),
            "profiles": profile_table(normalised(xyz, box), comp / amp), "superior_state": states,
            "spine_max_mm": float(np.linalg.norm(spine, axis=0).max()), "end_exhale_phase": ph.curve.peak,
            "curve_n": ph.curve.n, "hysteresis_loop_mm": loop}
