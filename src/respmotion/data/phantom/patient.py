"""One synthetic patient (:class:`Phantom`): its anatomy moved by its motion, sampled on the base grid.

The base grid is :data:`~.params.FOV_MM` centred on the LPS origin with the requested shape ``(z, y, x)``.  A
phase's image is the reference anatomy pulled through the phase's exact field, with the lungs' density following
the motion's Jacobian (mass preserved) and Gaussian noise added.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ...anatomy.masks import BODY_THRESHOLD_HU
from ...core import grid
from ...core.geometry import Geometry
from ...core.warp import mass_preserving_hu
from .anatomy import Anatomy
from .curve import BreathingCurve
from .motion import Motion
from .params import DEFAULT_SHAPE, FOV_MM, PhantomParams


class Phantom:
    """One synthetic patient of seed ``seed``: parameters ``p`` (:class:`PhantomParams`), reference ``anatomy``
    (:class:`Anatomy`), breathing ``curve`` (:class:`BreathingCurve`, per ``phase_curve``: ``"patient"`` or
    ``"population"``), analytic ``motion`` (:class:`Motion`) and the base grid ``geometry``.  ``noise_hu``: sd
    (HU) of the noise added to each phase's image."""

    def __init__(self, seed: int, shape: Sequence[int] = DEFAULT_SHAPE, noise_hu: float = 10.0,
                 phase_curve: str = "patient"):
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.p = PhantomParams.draw(self.rng)
        self.noise_hu = float(noise_hu)
        self.geometry = Geometry.centred(tuple(int(s) for s in shape), FOV_MM)
        self.anatomy = Anatomy(self.p, self.rng, self.geometry, self.seed)
        self.curve = BreathingCurve.for_patient(self.seed, phase_curve)
        self.motion = Motion(self.p, self.curve)
        self._calibrate_amplitude()

    def _calibrate_amplitude(self) -> None:
        """Scale ``amp_si`` so that the lung's points (the uniform ``lung_parenchyma`` landmarks) move superiorly by
        ``amp_mean_si`` on average at 50 % (two exact-inverse corrections; the motion is nearly linear in it)."""
        a = self.anatomy
        pts = np.array([c for c, k in zip(a.landmarks_ref, a.landmark_kind) if k == "lung_parenchyma"])
        for _ in range(2):
            up = float((self.move_points(50, pts)[:, 0] - pts[:, 0]).mean())
            self.p.amp_si *= self.p.amp_mean_si / up

    # ------------------------------------------------------------------ motion at points
    def states(self, percent: float) -> tuple[float, float]:
        """(SI state, AP/LR state) of this patient at ``percent`` (:meth:`Motion.states`)."""
        return self.motion.states(percent)

    def displacement(self, percent: float, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Exact pull field of ``percent`` relative to phase 0, at points (z, y, x) mm -> (3, ...) mm."""
        return self.motion.displacement(percent, z, y, x)

    def move_points(self, percent: float, points_zyx: np.ndarray, tol: float = 1e-7) -> np.ndarray:
        """Where reference points (mm, z,y,x, ``(..., 3)``) are at ``percent`` -> ``(..., 3)`` mm
        (:meth:`Motion.move_points`)."""
        return self.motion.move_points(percent, points_zyx, tol)

    # ------------------------------------------------------------------ the base grid
    def base_coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates (mm, float64) of the base grid's voxel centres: ``Z, Y, X``, each ``(nz, ny, nx)``."""
        return np.meshgrid(self.geometry.axis_mm(0), self.anatomy.ys, self.anatomy.xs, indexing="ij")

    def prepare(self) -> None:
        """Build the cached base-grid inputs that :meth:`phase` and :meth:`step_field` share (coordinates, the
        unit field and its slopes, the filtered fine reference), so that threads computing phases concurrently
        only read them."""
        self._coords64()
        self._coords32()
        self.unit_field()
        self._unit_slopes()
        self.anatomy.filtered_stack()

    def _coords64(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not hasattr(self, "_c64"):
            self._c64 = self.base_coords()
        return self._c64

    def _coords32(self) -> list[np.ndarray]:
        if not hasattr(self, "_c32"):
            self._c32 = [c.astype(np.float32) for c in self._coords64()]
        return self._c32

    def unit_field(self) -> np.ndarray:
        """Field at s = h = 1 on the base grid ``(3, Z, Y, X)`` mm, float32 (cached); phase k's field is ``s_k``
        times its z component and ``h_k`` times its y and x components."""
        if not hasattr(self, "_unit"):
            Z, Y, X = self._coords64()
            self._unit = self.motion.displacement_at(1.0, 1.0, Z, Y, X).astype(np.float32)
        return self._unit

    def _unit_slopes(self) -> np.ndarray:
        if not hasattr(self, "_slopes"):
            self._slopes = self.motion.unit_slopes(self.geometry.axis_mm(0), self.anatomy.ys, self.anatomy.xs)
        return self._slopes

    def field(self, percent: int) -> np.ndarray:
        """Exact pull field of one phase relative to phase 0 on the base grid ``(3, Z, Y, X)`` mm, float32."""
        s, h = self.states(percent)
        return np.array([s, h, h], np.float32)[:, None, None, None] * self.unit_field()

    def jacobian(self, percent: float) -> np.ndarray:
        """Exact Jacobian determinant ``(Z, Y, X)`` of the pull map ``p -> p + u_k(p)`` of one phase on the base
        grid (> 0; > 1 where the tissue is squeezed, e.g. the lungs at exhale)."""
        s, h = self.states(percent)
        d = self._unit_slopes()
        return (1.0 + s * d[0]) * (1.0 + h * d[1]) * (1.0 + h * d[2])

    def phase(self, percent: int) -> dict[str, np.ndarray]:
        """Image (HU), lung/body masks and exact field of one phase on the base grid: ``image`` ``(Z, Y, X)``
        float32, ``lung`` and ``body`` uint8, ``dvf`` ``(3, Z, Y, X)`` mm (:meth:`field`).

        The reference is pulled through the exact field; inside the lungs (weighted by the pulled lung
        occupancy) the density follows the motion's exact Jacobian, keeping the lungs' mass
        (:func:`respmotion.core.warp.mass_preserving_hu`, the law synthesis applies); then the noise is added
        (its generator seeded by ``[seed, percent]``)."""
        Z, Y, X = self._coords32()
        u = self.field(percent)
        img, lung = self.anatomy.sample(Z + u[0], Y + u[1], X + u[2])
        img = mass_preserving_hu(torch.from_numpy(img), torch.from_numpy(self.jacobian(percent)),
                                 torch.from_numpy(lung)).numpy()
        if self.noise_hu > 0:
            img += np.random.default_rng([self.seed, percent]).normal(0.0, self.noise_hu, img.shape).astype(np.float32)
        body = img > BODY_THRESHOLD_HU
        return {"image": img, "lung": (lung >= 0.5).astype(np.uint8), "body": body.astype(np.uint8), "dvf": u}

    def step_field(self, percent: int, next_percent: int) -> np.ndarray:
        """Exact pull field ``(3, Z, Y, X)`` mm, float32, from phase ``percent`` to phase ``next_percent`` on the
        base grid: ``x + t(x) = phi_k^-1(phi_next(x))``, composed from the stored (float32) reference field of
        ``next_percent`` and the exact inverse of phase ``percent`` (solved to 1e-6 mm)."""
        Z, Y, X = self._coords64()
        u1 = self.field(next_percent).astype(np.float64)
        s0, h0 = self.states(percent)
        tz = Z + u1[0]
        # y (x) of the target depends on y (x) only: solve those on one line; z with the per-component states.
        # start Newton at the first-order solution q ~ x + (s_k+1 - s_k) U(x): 2-3 steps to 1e-6 mm
        unit_z = self.unit_field()[0].astype(np.float64)
        q = self.motion.solve_inverse(s0, h0, tz, (Y + u1[1])[:1, :, :1], (X + u1[2])[:1, :1, :], tol=1e-6,
                                      z0=tz - s0 * unit_z)
        return np.stack([q[..., 0] - Z, q[..., 1] - Y, q[..., 2] - X]).astype(np.float32)

    def landmark_margin(self) -> float:
        """Distance (mm) from the sliding interface below which the stored field does not resolve the
        motion: within it the shear across the interface (``slide_width`` wide) is steeper than trilinear
        interpolation on this grid follows (up to ~3 mm at 16x64x64).  Two in-plane voxels + 4 widths."""
        return float(max(grid.to_mm(2.0, self.geometry.spacing[1:]))) + 4.0 * self.p.slide_width


def make_patient(seed: int, shape: Sequence[int] = DEFAULT_SHAPE, noise_hu: float = 10.0,
                 phase_curve: str = "patient") -> Phantom:
    """The phantom patient of ``seed`` on a base grid of ``shape`` ``(z, y, x)`` voxels (:class:`Phantom`)."""
    return Phantom(seed, shape, noise_hu, phase_curve)
