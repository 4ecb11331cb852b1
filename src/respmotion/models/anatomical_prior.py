"""The default motion model: the measured DIR-Lab population breathing laid into a CT's own anatomy, no network.

:class:`AnatomicalPrior` computes the fields of a CT (deterministic); :class:`PriorMotion` is it as a synthesis
motion model (``respmotion synthesize`` without ``--model``; docs/motion.md).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

class AnatomicalPrior:
    """Population breathing motion (the measured DIR-Lab reference) expressed in a given CT's own anatomy.

    For a CT ``(z, y, x)`` HU: lung/body/bone masks and the motion weight map
    (:func:`respmotion.anatomy.lung_frame.motion_regions`: lungs 1, below the diaphragm decaying, mediastinum
    small, vertebrae/ribs/chest wall 0, so the lungs slide along the chest wall), normalised lung coordinates
    from the CT's own lung extent, and the reference's end-exhale displacement per mm of amplitude there
    (:func:`respmotion.data.motion_reference.spatial_unit`).  Phase ``k``'s point motion (push, mm) is
    ``D_k = A * weight * (s_k * superior, h_k * posterior, h_k * lateral)`` with the reference's phase curve
    (``s``: superior-inferior, ``h``: AP/LR with hysteresis; :func:`~respmotion.data.motion_reference.phase_state`),
    and the returned pull field solves ``u(q) = -D_k(q + u(q))`` (fixed point, :data:`INVERSE_ITERATIONS`).

    ``amplitude_mm``: the mean superior displacement of the lung at 50 % (the one number a user knows,
    e.g. from a 4D-CT's landmarks); ``None`` = the DIR-Lab median.  ``peak``: end-exhale phase as a
    fraction (``None`` = the reference's).  Deterministic: the same CT gives the same fields.
    """

    INVERSE_ITERATIONS = 6

    def __init__(self, amplitude_mm: float | None = None, peak: float | None = None,
                 reference: dict[str, Any] | None = None) -> None:
        from ..data.motion_reference import load_reference

        self.reference = reference or load_reference()
        pc = self.reference["phase_curve"]
        self.n, self.eta = float(pc["n"]), float(pc["eta"])
        self.peak = float(pc["peak"] if peak is None else peak)
        if not 0.05 <= self.peak <= 0.95:
            raise ValueError(f"end-exhale phase must be a fraction in [0.05, 0.95], got {self.peak}")
        a = self.reference["spatial_model"]["amplitude_median_mm"] if amplitude_mm is None else float(amplitude_mm)
        if not (math.isfinite(a) and a >= 0):
            raise ValueError(f"breathing amplitude must be a finite number of mm >= 0, got {amplitude_mm}")
        self.amplitude_mm = a

    def states(self, percent: float) -> tuple[float, float]:
        """(SI state, AP/LR state) of a phase, scaled so that the SI state is 1 at 50 %."""
        from ..data.motion_reference import phase_state

        s50 = float(phase_state(50.0, self.n, self.peak)[0])
        s, h = phase_state(float(percent), self.n, self.peak, self.eta)
        return float(s) / s50, float(h) / s50

    def unit_push(self, hu: np.ndarray, geometry, regions: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """End-exhale point motion per mm of amplitude times the weight map, before the phase states:
        ``(3, z, y, x)`` with LPS world components ``(x, y, z)`` (x = lateral on the patient's left, medial on
        the right; y = posterior; z = superior)."""
        from ..anatomy.lung_frame import lateral_sign, lung_box, motion_regions, normalised, voxel_points
        from ..data.motion_reference import spatial_unit

        reg = regions if regions is not None else motion_regions(hu, geometry)
        box = lung_box(voxel_points(geometry, reg["lung"]))
        out = np.zeros((3, *hu.shape), np.float32)
        moving = np.argwhere(reg["weight"] > 0)
        model = self.reference["spatial_model"]
        for i in range(0, len(moving), 1 << 18):
            idx = moving[i:i + (1 << 18)]
            pts = geometry.index_to_world(idx.astype(np.float64))
            f = spatial_unit(model, normalised(pts, box))  # superior, posterior, lateral
            xyz = np.stack([f[:, 2] * lateral_sign(pts, box), f[:, 1], f[:, 0]], 1)
            out[:, idx[:, 0], idx[:, 1], idx[:, 2]] = (xyz * reg["weight"][tuple(idx.T)][:, None]).T
        return out

    def fields(self, hu: np.ndarray, geometry, phases: Sequence[int] = tuple(range(0, 100, 10)),
               regions: dict[str, np.ndarray] | None = None) -> dict[int, np.ndarray]:
        """Pull fields ``{phase: (3, z, y, x) mm}`` (array-axis components) of a CT ``(z, y, x)`` HU."""
        from ..core import warp as W

        unit = self.unit_push(hu, geometry, regions)  # LPS x, y, z (weighted)
        out = {}
        for k in phases:
            s, h = self.states(k)
            if s == 0 and h == 0:
                out[int(k)] = np.zeros_like(unit)
                continue
            push_xyz = self.amplitude_mm * np.stack([h * unit[0], h * unit[1], s * unit[2]])
            push = torch.from_numpy(geometry.world_to_axes(push_xyz, axis=0).astype(np.float32))[None]
            u = W.invert(push, geometry.spacing, iterations=self.INVERSE_ITERATIONS, tol_mm=0.0)  # all iterations
            out[int(k)] = u[0].numpy()
        return out


class PriorMotion:
    """The anatomical prior as a synthesis motion model (``shape``, ``generate``): no network, no training.
    The default motion model when no ``--model`` is given (docs/motion.md).

    Every sample is the same population cycle (the prior has no randomness); ``meta`` records what it is
    (copied into every field's ``meta``)."""

    SHAPE = (48, 128, 128)
    resamples_input = False

    def __init__(self, amplitude_mm: float | None = None, shape: Sequence[int] = SHAPE) -> None:
        from ..data.motion_reference import reference_sha256

        self.prior = AnatomicalPrior(amplitude_mm)
        self.shape = tuple(int(s) for s in shape)
        self.meta = {"model": "anatomical population prior (no network)",
                     "calibrated_on": "DIR-Lab 4D-CT landmarks, cases 1-9 (population motion model; make "
                                      "motion-reference); not trained on images, not validated clinically",
                     "reference_sha256": reference_sha256(),
                     "amplitude_mm": self.prior.amplitude_mm, "peak_phase": self.prior.peak}

    def describe(self) -> dict:
        """What summary.json records about the motion (the model's label and provenance)."""
        return {"kind": "anatomical prior", "model_shape": list(self.shape), **self.meta}

    def generate(self, ct, samples: int, seed: int) -> list[dict]:
        from ..core.types import DisplacementField

        fields = self.prior.fields(np.asarray(ct.array, np.float32), ct.geometry)
        cycle = {k: DisplacementField(f, ct.geometry, {**self.meta, "phase": k}) for k, f in fields.items()}
        return [cycle for _ in range(samples)]
