"""A synthetic thoracic 4D-CT with exactly known motion (our ground truth).

Anatomy (HU): body with a fat layer, chest-wall muscle, ribs, spine, two lungs with a textured
parenchyma, branching vessels and nodules, heart, liver and a stomach gas bubble, a domed
diaphragm.  It is drawn once in the *reference* (end-inhale, phase 00) frame on a grid twice as
fine along z, extended below and above the field of view.

Motion (analytic, in mm, pull convention of :mod:`respmotion.core.types`), calibrated on the measured
DIR-Lab reference (:mod:`respmotion.data.motion_reference`, table in docs/motion.md): for phase k with
breathing states ``(s_k, h_k)`` of the patient's own curve (:class:`BreathingCurve`: the reference's asymmetric
Lujan cos^2n curve with a per-patient end-exhale phase and exponent; ``s`` 0 at 00 = end-inhale, 1 at 50; ``h``
the AP/LR state, lagging ``s`` on exhale and leading it on inhale: hysteresis)::

    u_z(p) = -A * s * g(z, dome) * w(y, x) * ap(y) * ml(x)   superior-inferior: largest at the posterior,
                                              lateral base; only inside the rib cage and away from the spine
                                              (w: sliding interfaces), small in the mediastinum
    u_y(p) = -B * h * a(y)                    anterior-posterior, the anterior chest wall moves most
    u_x(p) = +C * h * x / X                   lateral contraction at exhale

``A`` is set per patient so that the lung's mean superior motion at 50 % is an amplitude drawn from the
DIR-Lab distribution (:class:`PhantomParams`); ``B`` and ``C`` are fractions of it.
``phase_k(p) = phase_00(p + u_k(p))``.  Because ``u_y`` depends on y only and ``u_x`` on x only,
the Jacobian matrix is triangular and ``det = (1 + du_z/dz)(1 + du_y/dy)(1 + du_x/dx)``, which is
> 0 by construction even across the sliding interface, where ``u_z`` shears steeply in y and x
(the lungs slide along the chest wall, the ribs and spine do not move superior-inferiorly).
Landmarks move with the inverse map (solved to 1e-6 mm); consecutive-phase fields are exact
compositions ``t_k = phi_k^-1 o phi_{k+1} - id``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core import grid
from ..core.geometry import Geometry
from ..core.types import DisplacementField, Volume
from ..io.atomic import clean_stale_tmp, write_json, write_npy
from ..io.layout import PHASES, StudyDir, next_phase
from ..runtime import check_allocation

FOV_MM = (150.0, 358.4, 358.4)  # z, y, x field of view
DEFAULT_SHAPE = (50, 256, 256)
_EXT_BELOW, _EXT_ABOVE = 36.0, 12.0  # mm of anatomy drawn beyond the FOV (motion pulls from there)

#: motion shape, calibrated on the DIR-Lab reference (docs/motion.md): AP and lateral excursion per mm of mean
#: superior lung motion; SI motion gain from anterior to posterior and from medial to lateral (linear, x 1 at the
#: cavity's centre line), and the exponent of the SI profile from the diaphragm (t = 0) to the apex (t = 1).
AP_PER_SI, LR_PER_SI = 0.2, 0.25
SI_AP_GAIN, SI_ML_GAIN, SI_PROFILE_EXP = 1.6, 1.0, 1.5

SPINE_Y, SPINE_R = 0.72, 17.0  # vertebral body centre (x body_ay, posterior) and radius, mm
SKIN_DEPTH_MM = 6.0  # chest-wall landmarks stay at least this deep under the skin (at end-inhale)
SPINE_STATIC_R = 26.0  # mm: SI motion fades out (over slide_width) this far from the spine's axis (< 1 mm inside)

#: end-exhale phase (fraction of the cycle) of a phantom patient: uniform in this range.  The low end is DIR-Lab's
#: earliest per-case end-exhale (case 2: 0.50, ``phase_curve.peak_per_case``); DIR-Lab cannot show a later one than
#: 0.55 (its T50 is the extreme phase by construction, so the per-case fit is capped there), so the high end is an
#: assumption from physiology: expiration lasts longer than inspiration (an I:E of 1:1 to 1:1.5 in quiet breathing
#: puts end-exhale at 50-60 % of a phase-binned cycle; Lujan et al. 1999 model the longer dwell near exhale).  The
#: mean, 0.55, is the reference's population end-exhale phase (docs/motion.md).
PEAK_RANGE = (0.50, 0.60)
#: ``phase_curve`` choices: each patient its own curve (default), or every patient the reference's population curve
#: (timing then carries no patient-to-patient noise: what a model can learn from a CT alone, e.g. the CI chain test)
PHASE_CURVES = ("patient", "population")
CURVE_STREAM = 18  # second word of the seed of a patient's phase-curve generator ([seed, CURVE_STREAM])

HU_AIR, HU_LUNG, HU_FAT, HU_SOFT, HU_BLOOD, HU_LIVER, HU_BONE = -1000.0, -860.0, -100.0, 40.0, 45.0, 60.0, 650.0


@dataclass(frozen=True)
class BreathingCurve:
    """One patient's phase curve: exponent ``n``, end-exhale phase ``peak`` (fraction of the cycle) and hysteresis
    ``eta`` of the reference's curve (:func:`respmotion.data.motion_reference.phase_state`, the one the anatomical
    prior uses)."""

    n: float
    peak: float
    eta: float

    @classmethod
    def population(cls) -> "BreathingCurve":
        """The reference's population curve (fitted to DIR-Lab's mean exhale half)."""
        from .motion_reference import load_reference

        pc = load_reference()["phase_curve"]
        return cls(float(pc["n"]), float(pc["peak"]), float(pc["eta"]))

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "BreathingCurve":
        """A patient's curve: ``peak`` uniform in :data:`PEAK_RANGE`; ``n`` log-normal with the mean and sd of
        log n over the DIR-Lab cases (each case's own exponent at its own end-exhale phase,
        :func:`~respmotion.data.motion_reference.exponent_per_case`), clipped to their range; ``eta`` the
        reference's (DIR-Lab median in-plane lag)."""
        from .motion_reference import exponent_per_case, load_reference

        pc = load_reference()["phase_curve"]
        log_n = np.log(exponent_per_case(pc))
        peak = rng.uniform(*PEAK_RANGE)
        n = float(np.exp(np.clip(rng.normal(log_n.mean(), log_n.std()), log_n.min(), log_n.max())))
        return cls(n, float(peak), float(pc["eta"]))

    def states(self, percent: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(SI state ``s``, AP/LR state ``h``) of a phase in percent, both divided by ``s`` at 50 %: ``s`` is 0 at
        0 % (end-inhale) and exactly 1 at 50 % (where the amplitude is defined, as DIR-Lab's T00 -> T50), largest
        at ``peak``; ``h`` lags ``s`` on the exhale branch and leads it on the inhale branch when ``eta`` < 0."""
        from .motion_reference import phase_state

        s, h = phase_state(percent, self.n, self.peak, self.eta)
        s50 = phase_state(50.0, self.n, self.peak)[0]
        at50 = np.mod(np.asarray(percent, dtype=np.float64), 100.0) == 50.0
        return np.where(at50, 1.0, s / s50), h / s50

    def same_si_state(self, percent: float | np.ndarray) -> np.ndarray:
        """The inhale-branch phase (percent) with the same SI state as the exhale-branch phase ``percent``
        (0 <= percent <= 100 * peak): where a point's path would retrace itself without hysteresis."""
        x = np.asarray(percent, dtype=np.float64) / (100.0 * self.peak)
        return 100.0 * (1.0 - x * (1.0 - self.peak))


@dataclass
class PhantomParams:
    """Patient-specific anatomy and motion drawn from the seed (mm, HU)."""

    body_ax: float
    body_ay: float
    cavity_scale: float
    dome_z: float
    dome_height: float
    right_dome_offset: float
    amp_mean_si: float  # mean superior displacement of the lung at 50 %, mm (drawn from the DIR-Lab amplitudes)
    amp_si: float  # diaphragm superior-inferior excursion scale, mm (set so the lung's mean is amp_mean_si)
    amp_ap: float  # anterior chest wall excursion, mm
    amp_lr: float  # lateral excursion at the body edge, mm
    lr_asym: float  # left/right SI amplitude asymmetry
    abdomen_decay: float  # mm, SI motion decay below the diaphragm
    slide_width: float  # mm, width of the sliding interface

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "PhantomParams":
        """Anatomy is random; motion follows the anatomy visible at end-inhale (plus a little noise),
        so a model that sees the reference CT can predict it better than a population mean:
        a lower diaphragm at end-inhale means a deeper breath, a deeper chest a larger AP motion.

        The breath's amplitude (mean superior lung motion at 50 %) is the quantile of the measured DIR-Lab
        log-normal amplitude distribution (``motion_reference.json``) that the diaphragm's depth picks
        (5 %..95 %), times 5 % noise; AP and lateral excursions are fractions of it (:data:`AP_PER_SI`,
        :data:`LR_PER_SI`) that grow with the chest's depth and width."""
        from statistics import NormalDist

        from .motion_reference import load_reference

        amp = load_reference()["amplitude"]
        body_ax, body_ay = rng.uniform(150, 168), rng.uniform(105, 122)
        dome_z, right_offset = rng.uniform(-50, -38), rng.uniform(4, 12)
        depth = np.clip((-38.0 - dome_z) / 12.0, 0.0, 1.0)
        z = NormalDist().inv_cdf(0.05 + 0.9 * float(depth))
        mean_si = math.exp(amp["log_mean"] + amp["log_sd"] * z + rng.normal(0.0, 0.05))
        return cls(
            body_ax=body_ax,
            body_ay=body_ay,
            cavity_scale=rng.uniform(0.80, 0.84),
            dome_z=dome_z,
            dome_height=rng.uniform(14, 22),
            right_dome_offset=right_offset,
            amp_mean_si=mean_si,
            amp_si=mean_si,  # rescaled by Phantom once the lungs are drawn
            amp_ap=mean_si * AP_PER_SI * (0.8 + 0.4 * (body_ay - 105.0) / 17.0),
            amp_lr=mean_si * LR_PER_SI * (0.8 + 0.4 * (body_ax - 150.0) / 18.0),
            lr_asym=(right_offset - 8.0) / 30.0,
            abdomen_decay=rng.uniform(70, 80),
            slide_width=2.0,
        )


class Phantom:
    """One synthetic patient: reference anatomy and analytic motion."""

    def __init__(self, seed: int, shape: Sequence[int] = DEFAULT_SHAPE, noise_hu: float = 10.0,
                 phase_curve: str = "patient"):
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.p = PhantomParams.draw(self.rng)
        self.noise_hu = float(noise_hu)
        shape = tuple(int(s) for s in shape)
        self.geometry = Geometry.centred(shape, FOV_MM)
        # fine reference grid: z spacing halved, extended beyond the FOV; same y, x samples
        self.fine_dz = float(grid.to_mm(0.5, self.geometry.spacing[0]))
        z0 = -FOV_MM[0] / 2 - _EXT_BELOW
        nzf = int(math.ceil(grid.to_voxels(FOV_MM[0] + _EXT_BELOW + _EXT_ABOVE, self.fine_dz)))
        self.fine_z = grid.centres_from_edge(nzf, self.fine_dz, z0)
        self.ys = self.geometry.axis_mm(1)
        self.xs = self.geometry.axis_mm(2)
        self._draw_anatomy()
        # the phase curve from a generator of its own: anatomy and amplitude of a seed do not depend on it
        self.curve = (BreathingCurve.draw(np.random.default_rng([self.seed, CURVE_STREAM]))
                      if phase_curve == "patient" else BreathingCurve.population())
        self._calibrate_amplitude()

    def _calibrate_amplitude(self) -> None:
        """Scale ``amp_si`` so that the lung's points (the uniform ``lung_parenchyma`` landmarks) move superiorly by
        ``amp_mean_si`` on average at 50 % (two exact-inverse corrections; the motion is nearly linear in it)."""
        pts = np.array([c for c, k in zip(self.landmarks_ref, self.landmark_kind) if k == "lung_parenchyma"])
        for _ in range(2):
            up = float((self.move_points(50, pts)[:, 0] - pts[:, 0]).mean())
            self.p.amp_si *= self.p.amp_mean_si / up

    # ------------------------------------------------------------------ shapes
    def _cavity_r(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Normalised elliptic radius of the rib cage's inner surface (1 on the surface)."""
        p = self.p
        ax, ay = p.body_ax * p.cavity_scale, p.body_ay * p.cavity_scale
        yc = -0.08 * p.body_ay  # cavity slightly anterior: the spine stays outside it
        return np.sqrt((x / ax) ** 2 + ((y - yc) / ay) ** 2)

    def dome(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """z (mm) of the diaphragm surface at (y, x): two domes, the right one higher."""
        p = self.p
        cx = 0.45 * p.body_ax * p.cavity_scale
        r2 = ((np.abs(x) - cx) / (0.55 * p.body_ax * p.cavity_scale)) ** 2 + ((y + 0.05 * p.body_ay) / (0.8 * p.body_ay)) ** 2
        right = 1.0 / (1.0 + np.exp(x / 15.0))  # smooth step: LPS -x is the patient's right
        return p.dome_z + p.dome_height * np.exp(-1.5 * r2) + p.right_dome_offset * right

    # ------------------------------------------------------------------ motion
    # The motion model is separable: u_y depends on y, u_x on x, and u_z = amp2d(y, x) * g(z, dome(y, x)).
    def _g_dg(self, z: np.ndarray, zd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SI profile g and its slope dg/dz: g = 1 at the diaphragm (zero slope there, so the field is
        C1), falling as ``1 - t**SI_PROFILE_EXP`` to 0 at the apex level and as a Gaussian into the abdomen."""
        d = z - zd
        h = FOV_MM[0] / 2 + _EXT_ABOVE - zd  # 0 at the top of the drawn lungs (apex)
        above = d >= 0
        t = np.clip(d / h, 0.0, 1.0)
        q = SI_PROFILE_EXP
        e = np.exp(-((np.minimum(d, 0.0) / self.p.abdomen_decay) ** 2))  # 1 above the dome: no overflow
        g = np.where(above, 1.0 - t**q, e)
        dg = np.where(above, np.where(t < 1.0, -q * t ** (q - 1.0) / h, 0.0), -2.0 * d / self.p.abdomen_decay**2 * e)
        return g, dg

    def _g(self, z: np.ndarray, zd: np.ndarray) -> np.ndarray:
        return self._g_dg(z, zd)[0]

    def _uz_parts(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dome z, SI amplitude at s = 1 incl. sliding weight) at (y, x): largest at the posterior, lateral base
        (gains :data:`SI_AP_GAIN`, :data:`SI_ML_GAIN` across the cavity), small in the mediastinum."""
        p = self.p
        ax, ay = p.body_ax * p.cavity_scale, p.body_ay * p.cavity_scale
        w = 1.0 / (1.0 + np.exp((self._cavity_r(y, x) - 1.0) * ax / p.slide_width))
        spine_r = np.sqrt(x * x + (y - SPINE_Y * p.body_ay) ** 2)  # the spine does not move: weight ~0 inside
        w = w / (1.0 + np.exp((SPINE_STATIC_R - spine_r) / p.slide_width))
        lr = 1.0 + p.lr_asym * np.tanh(x / 40.0)
        ap = 1.0 + 0.5 * SI_AP_GAIN * np.clip((y + 0.08 * p.body_ay) / ay, -1.0, 1.0)
        ml = 1.0 + SI_ML_GAIN * (np.clip(np.sqrt(x * x + 25.0) / ax, 0.0, 1.0) - 0.5)
        return self.dome(y, x), -p.amp_si * w * lr * ap * ml

    def _uy(self, y: np.ndarray) -> np.ndarray:
        p = self.p
        y_ant, y_post = -p.body_ay, 0.75 * p.body_ay
        return -p.amp_ap * np.clip((y_post - y) / (y_post - y_ant), 0.0, 1.0) ** 1.5

    def _ux(self, x: np.ndarray) -> np.ndarray:
        return self.p.amp_lr * np.clip(x / self.p.body_ax, -1.2, 1.2)

    def states(self, percent: float) -> tuple[float, float]:
        """(SI state, AP/LR state) of this patient at ``percent`` (:meth:`BreathingCurve.states`)."""
        s, h = self.curve.states(float(percent))
        return float(s), float(h)

    def displacement(self, percent: float, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Exact pull field of ``percent`` relative to phase 0, at points (z, y, x) mm -> (3, ...) mm."""
        return self._displacement_at(*self.states(percent), z, y, x)

    def _displacement_at(self, s: float, h: float, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Pull field (3, ...) mm at points (z, y, x) mm for SI state ``s`` and AP/LR state ``h``."""
        z, y, x = np.broadcast_arrays(np.asarray(z, float), np.asarray(y, float), np.asarray(x, float))
        zd, amp = self._uz_parts(y, x)
        return np.stack([s * amp * self._g(z, zd), h * self._uy(y), h * self._ux(x)])

    def move_points(self, percent: float, points_zyx: np.ndarray, tol: float = 1e-7) -> np.ndarray:
        """Where reference points (mm, z,y,x) are at ``percent``: solve q + u(q) = p."""
        p = np.asarray(points_zyx, dtype=np.float64)
        return self._solve_inverse(*self.states(percent), p[..., 0], p[..., 1], p[..., 2], tol)

    def _solve_inverse(self, s: float, h: float, tz, ty, tx, tol: float = 1e-7,
                       z0: np.ndarray | None = None) -> np.ndarray:
        """Solve q + U_{s,h}(q) = t component-wise (SI state ``s``, AP/LR state ``h``; y and x are 1D problems,
        then z given y, x).  ``z0``: optional starting guess for the z component (Newton converges in fewer
        steps)."""
        def fixed_point(f, t):
            q = np.array(t, dtype=np.float64, copy=True)
            for _ in range(200):
                q_new = t - f(q)
                if np.max(np.abs(q_new - q)) < tol:
                    return q_new
                q = q_new
            raise RuntimeError("phantom inversion did not converge")

        qy = fixed_point(lambda q: h * self._uy(q), np.asarray(ty, float))
        qx = fixed_point(lambda q: h * self._ux(q), np.asarray(tx, float))
        qz = self._solve_z(s, np.asarray(tz, float), qy, qx, tol, z0)
        return np.stack(np.broadcast_arrays(qz, qy, qx), -1)

    def _solve_z(self, s: float, tz: np.ndarray, qy: np.ndarray, qx: np.ndarray, tol: float,
                 z0: np.ndarray | None = None) -> np.ndarray:
        """Newton's method for q + s * amp(y, x) * g(q, dome) = tz (g is piecewise smooth, 1 + s amp g' > 0)."""
        zd, amp = self._uz_parts(qy, qx)
        shape = np.broadcast_shapes(tz.shape, zd.shape)
        start = tz if z0 is None else z0
        q = np.array(np.broadcast_to(start, shape), dtype=np.float64).ravel()
        tz, zd, amp = (np.broadcast_to(a, shape).ravel() for a in (tz, zd, amp))
        active = np.arange(q.size)  # Newton on the points not yet converged only
        for _ in range(50):
            qa, za, aa = q[active], zd[active], s * amp[active]
            g, dg = self._g_dg(qa, za)
            step = (qa + aa * g - tz[active]) / (1.0 + aa * dg)
            q[active] = qa - step
            active = active[np.abs(step) >= tol]
            if active.size == 0:
                return q.reshape(shape)
        raise RuntimeError("phantom inversion did not converge")

    # ------------------------------------------------------------------ anatomy
    def _smooth_noise(self, shape: tuple[int, int, int], factor: int) -> np.ndarray:
        small = [max(2, s // factor) for s in shape]
        n = torch.from_numpy(self.rng.standard_normal(small).astype(np.float32))[None, None]
        up = F.interpolate(n, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
        return up / (up.std() + 1e-6)

    def _draw_anatomy(self) -> None:
        p, rng = self.p, self.rng
        Z = self.fine_z[:, None, None]
        Y = self.ys[None, :, None]
        X = self.xs[None, None, :]
        shape = (len(self.fine_z), len(self.ys), len(self.xs))
        img = np.full(shape, HU_AIR, dtype=np.float32)

        body_r = np.sqrt((X / p.body_ax) ** 2 + (Y / p.body_ay) ** 2)  # (1, ny, nx)
        body = np.broadcast_to(body_r <= 1.0, shape)
        fat = body_r > 1.0 - 12.0 / p.body_ay
        img[body] = HU_SOFT
        img[np.broadcast_to(fat & (body_r <= 1.0), shape)] = HU_FAT
        soft_tex = self._smooth_noise(shape, 8) * 12.0
        img += np.where(body, soft_tex, 0.0).astype(np.float32)

        # spine: vertebral body + canal, posterior midline
        sy, srad = SPINE_Y * p.body_ay, SPINE_R
        spine_r = np.sqrt(X**2 + (Y - sy) ** 2)
        img[np.broadcast_to(spine_r < srad, shape)] = HU_BONE
        img[np.broadcast_to(np.sqrt(X**2 + (Y - sy - 24) ** 2) < 8, shape)] = HU_SOFT

        # ribs: bone bands on a shell just outside the cavity, periodic along z
        cav = self._cavity_r(Y, X)  # (1, ny, nx)
        shell = (cav > 1.02) & (cav < 1.10)
        angle = np.arctan2(Y, X)
        rib_phase = np.sin(2 * math.pi * (Z + 6.0 * angle) / 26.0)  # ribs slope
        ribs = shell & (rib_phase > 0.55) & (Y < 0.7 * p.body_ay)
        img[ribs] = HU_BONE

        # lungs: inside the cavity, above the diaphragm, outside the mediastinum
        zd = self.dome(Y, X)
        med_half = 22.0 + 18.0 * np.clip(1.0 - (Y + 0.3 * p.body_ay) ** 2 / (0.5 * p.body_ay) ** 2, 0, 1)
        lungs = (cav < 0.985) & (Z > zd + 1.5) & (np.abs(X) > med_half)
        lungs = np.broadcast_to(lungs, shape)
        self.lung_ref = lungs.copy()
        lung_tex = self._smooth_noise(shape, 2) * 45.0 + self._smooth_noise(shape, 8) * 25.0
        img[lungs] = (HU_LUNG + lung_tex)[lungs]

        # heart: ellipsoid anterior-left, resting on the diaphragm
        hc = (zd.mean() * 0 + p.dome_z + p.dome_height + 28.0, -0.25 * p.body_ay, 18.0)
        heart = ((Z - hc[0]) / 42.0) ** 2 + ((Y - hc[1]) / 45.0) ** 2 + ((X - hc[2]) / 55.0) ** 2 < 1.0
        heart &= Z > zd
        img[heart] = HU_BLOOD + 10.0

        # abdomen below the diaphragm inside the cavity: liver (right), stomach gas (left)
        abd = (Z <= zd) & (cav < 1.0)
        img[abd & (X < 10)] = HU_LIVER
        stomach = ((Z - (p.dome_z - 18)) / 18.0) ** 2 + ((Y + 0.2 * p.body_ay) / 25.0) ** 2 + ((X - 55.0) / 30.0) ** 2 < 1.0
        img[stomach & abd] = HU_AIR + 50.0

        # vessels: branching tubes from the hila, only inside the lungs
        self.landmarks_ref: list[np.ndarray] = []
        self.landmark_kind: list[str] = []
        for side in (-1.0, 1.0):
            hilum = np.array([p.dome_z + p.dome_height + 45.0, -0.05 * p.body_ay, side * 34.0])
            for d0 in ([-0.6, 0.1, side], [0.5, -0.2, side], [-0.2, 0.6, 0.6 * side], [-0.3, -0.6, 0.6 * side]):
                self._grow(img, lungs, hilum, np.array(d0), 32.0, 3.5, 5)

        # nodules (the first one in the right lower lobe, the GTV stand-in)
        self.nodules: list[tuple[np.ndarray, float]] = []
        for i in range(2):
            for _ in range(200):
                if i == 0:
                    c = np.array([p.dome_z + p.dome_height + rng.uniform(12, 30), rng.uniform(-0.3, 0.3) * p.body_ay,
                                  -rng.uniform(55, 90)])
                else:
                    c = np.array([rng.uniform(-10, 50), rng.uniform(-0.4, 0.4) * p.body_ay,
                                  rng.choice([-1, 1]) * rng.uniform(50, 95)])
                r = rng.uniform(5.0, 8.0)
                if self._inside_lung(c, margin=r + 3.0):
                    break
            else:
                raise RuntimeError(f"phantom seed {self.seed}: could not place a nodule")
            d = np.sqrt((Z - c[0]) ** 2 + (Y - c[1]) ** 2 + (X - c[2]) ** 2)
            img[d < r] = HU_SOFT - 10.0 + 0.0
            self.nodules.append((c, r))
            self.landmarks_ref.append(c)
            self.landmark_kind.append("nodule")

        # extra landmarks: on ribs/spine (outside lungs) and random lung points near the base
        # in the lateral chest walls (ribs, muscle; thick enough to hold a landmark beyond the sliding margin),
        # 8 a side, outside the cavity by 55-100 % of the wall's depth (up to 18 % of the cavity radius and
        # SKIN_DEPTH_MM under the skin)
        for i in range(16):
            a = rng.uniform(-math.pi * 0.3, math.pi * 0.3) + math.pi * (i % 2)
            rr = 1.0 + rng.uniform(0.55, 1.0) * min(0.18, self._chest_wall_radius(a) - 1.0)
            pt = np.array([rng.uniform(-40, 50), rr * p.body_ay * p.cavity_scale * math.sin(a) - 0.08 * p.body_ay,
                           rr * p.body_ax * p.cavity_scale * math.cos(a)])
            self.landmarks_ref.append(pt)
            self.landmark_kind.append("chest_wall")
        # random lung points and points just below the lung base (sliding / abdomen)
        lung_idx = np.argwhere(lungs[:: 4, :: 4, :: 4])
        for i in rng.choice(len(lung_idx), size=min(300, len(lung_idx)), replace=False):
            iz, iy, ix = lung_idx[i] * 4
            self.landmarks_ref.append(np.array([self.fine_z[iz], self.ys[iy], self.xs[ix]]))
            self.landmark_kind.append("lung_parenchyma")
        for _ in range(40):
            a = rng.uniform(0, 2 * math.pi)
            r = rng.uniform(0.2, 0.95)
            yy = r * math.sin(a) * p.body_ay * p.cavity_scale - 0.08 * p.body_ay
            xx = r * math.cos(a) * p.body_ax * p.cavity_scale
            zz = float(self.dome(np.array(yy), np.array(xx))) - rng.uniform(3, 15)
            self.landmarks_ref.append(np.array([zz, yy, xx]))
            self.landmark_kind.append("below_diaphragm")
        self.reference_fine = img

    def _chest_wall_radius(self, angle: float) -> float:
        """Largest cavity radius (in cavity radii, along ``angle`` from the cavity's centre, as the chest-wall
        landmarks are placed) that stays :data:`SKIN_DEPTH_MM` inside the body surface: a landmark beyond the skin
        would lie in air, where no image tells where it moved."""
        p = self.p
        u = p.cavity_scale * math.cos(angle)  # x / body_ax per cavity radius
        v = p.cavity_scale * math.sin(angle)  # (y - yc) / body_ay per cavity radius
        w = -0.08  # yc / body_ay
        t = 1.0 - SKIN_DEPTH_MM / min(p.body_ax, p.body_ay)  # body radius to stay within
        # (r u)^2 + (r v + w)^2 = t^2, the positive root
        a2, b = u * u + v * v, v * w
        return float((-b + math.sqrt(b * b - a2 * (w * w - t * t))) / a2)

    def _inside_lung(self, c: np.ndarray, margin: float = 0.0) -> bool:
        offs = np.array([[0, 0, 0], [margin, 0, 0], [-margin, 0, 0], [0, margin, 0], [0, -margin, 0], [0, 0, margin], [0, 0, -margin]])
        for o in offs:
            q = c + o
            iz = int(round(grid.axis_index(q[0], self.fine_z[0], self.fine_dz)))
            iy = int(round(grid.axis_index(q[1], self.ys[0], self.ys[1] - self.ys[0])))
            ix = int(round(grid.axis_index(q[2], self.xs[0], self.xs[1] - self.xs[0])))
            if not (0 <= iz < len(self.fine_z) and 0 <= iy < len(self.ys) and 0 <= ix < len(self.xs)):
                return False
            if not self.lung_ref[iz, iy, ix]:
                return False
        return True

    def _grow(self, img, lungs, start, direction, length, radius, depth) -> None:
        """Draw one vessel segment and recurse into two thinner children (bifurcation landmarks)."""
        rng = self.rng
        d = direction / np.linalg.norm(direction)
        end = start + d * length
        self._tube(img, lungs, start, end, radius)
        if self._inside_lung(end):
            self.landmarks_ref.append(end)
            self.landmark_kind.append("vessel_bifurcation")
        if depth == 0:
            return
        for _ in range(2):
            nd = d + rng.normal(0, 0.6, 3)
            nd[0] -= 0.15  # the trees spread towards the base
            self._grow(img, lungs, end, nd, length * rng.uniform(0.6, 0.85), max(0.9, radius * 0.75), depth - 1)

    def _tube(self, img, lungs, a, b, radius) -> None:
        dy, dx = self.ys[1] - self.ys[0], self.xs[1] - self.xs[0]
        lo = np.minimum(a, b) - radius - 2
        hi = np.maximum(a, b) + radius + 2
        axes = ((self.fine_z, self.fine_dz), (self.ys, dy), (self.xs, dx))
        (iz0, iz1), (iy0, iy1), (ix0, ix1) = (
            (max(0, int(grid.axis_index(lo[a], c[0], d))), min(len(c), int(grid.axis_index(hi[a], c[0], d)) + 2))
            for a, (c, d) in enumerate(axes))
        if iz0 >= iz1 or iy0 >= iy1 or ix0 >= ix1:
            return
        Z = self.fine_z[iz0:iz1, None, None]
        Y = self.ys[None, iy0:iy1, None]
        X = self.xs[None, None, ix0:ix1]
        ab = b - a
        t = ((Z - a[0]) * ab[0] + (Y - a[1]) * ab[1] + (X - a[2]) * ab[2]) / float(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        dist = np.sqrt((Z - a[0] - t * ab[0]) ** 2 + (Y - a[1] - t * ab[1]) ** 2 + (X - a[2] - t * ab[2]) ** 2)
        prof = np.clip(radius + 0.5 - dist, 0.0, 1.0)  # ~1 voxel soft edge
        sub = img[iz0:iz1, iy0:iy1, ix0:ix1]
        inside = lungs[iz0:iz1, iy0:iy1, ix0:ix1]
        val = sub + prof * (HU_BLOOD - sub)
        sub[inside] = np.maximum(sub, val)[inside]

    # ------------------------------------------------------------------ sampling
    def _sample_fine(self, fine: np.ndarray, pts_z, pts_y, pts_x) -> np.ndarray:
        """Trilinear sample of fine-grid arrays ``(C, nzf, ny, nx)`` at mm points -> ``(C, *pts.shape)``."""
        n = fine.shape[1:]
        # normalised grid_sample coordinates (x, y, z order), float32: 4e-5 mm at this field of view
        axes = [(pts_x, self.xs[0], self.xs[1] - self.xs[0], n[2]), (pts_y, self.ys[0], self.ys[1] - self.ys[0], n[1]),
                (pts_z, self.fine_z[0], self.fine_dz, n[0])]
        g = torch.stack([grid.axis_to_normalized_(torch.as_tensor(np.asarray(p, np.float32)), o, d, m)
                         for p, o, d, m in axes], -1).reshape(1, -1, 1, 1, 3)
        src = torch.from_numpy(np.ascontiguousarray(fine, dtype=np.float32))[None]
        out = F.grid_sample(src, g, mode="bilinear", padding_mode="border", align_corners=True)
        return out.reshape((fine.shape[0],) + pts_z.shape).numpy()

    def base_coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.meshgrid(self.geometry.axis_mm(0), self.ys, self.xs, indexing="ij")

    def _unit_field(self) -> np.ndarray:
        """Field at s = h = 1 on the base grid ``(3, Z, Y, X)`` mm (cached); phase k's field is ``s_k`` times its
        z component and ``h_k`` times its y and x components."""
        if not hasattr(self, "_unit"):
            Z, Y, X = self.base_coords()
            self._unit = self._displacement_at(1.0, 1.0, Z, Y, X).astype(np.float32)
        return self._unit

    def _fine_stack(self) -> np.ndarray:
        """Reference image and lung mask on the fine grid, box-filtered over one base slice along z
        (partial-volume averaging of the two fine sub-slices of a base voxel)."""
        if not hasattr(self, "_stack"):
            st = np.stack([self.reference_fine, self.lung_ref.astype(np.float32)])
            pad = np.concatenate([st[:, :1], st, st[:, -1:]], axis=1)
            self._stack = 0.25 * pad[:, :-2] + 0.5 * pad[:, 1:-1] + 0.25 * pad[:, 2:]
        return self._stack

    def _base32(self) -> list[np.ndarray]:
        """Base-grid coordinates (mm, float32), cached."""
        if not hasattr(self, "_coords32"):
            self._coords32 = [c.astype(np.float32) for c in self.base_coords()]
        return self._coords32

    def field(self, percent: int) -> np.ndarray:
        """Exact pull field of one phase relative to phase 0 on the base grid ``(3, Z, Y, X)`` mm, float32."""
        s, h = self.states(percent)
        return np.array([s, h, h], np.float32)[:, None, None, None] * self._unit_field()

    def _unit_slopes(self) -> np.ndarray:
        """Diagonal Jacobian entries of the field at s = h = 1 on the base grid ``(3, Z, Y, X)``: ``du_z/dz``,
        ``du_y/dy``, ``du_x/dx`` (mm per mm, analytic; cached).  The Jacobian matrix is triangular (module doc),
        so phase k's determinant is the product of ``1 + (s_k, h_k, h_k) * slope``."""
        if not hasattr(self, "_slopes"):
            p = self.p
            Z, Y, X = self.base_coords()
            zd, amp = self._uz_parts(Y, X)
            duz = amp * self._g_dg(Z, zd)[1]
            y_ant, y_post = -p.body_ay, 0.75 * p.body_ay
            t = (y_post - self.ys) / (y_post - y_ant)
            duy = np.where((t > 0) & (t < 1), 1.5 * p.amp_ap * np.sqrt(np.clip(t, 0.0, 1.0)) / (y_post - y_ant), 0.0)
            dux = np.where(np.abs(self.xs / p.body_ax) < 1.2, p.amp_lr / p.body_ax, 0.0)
            self._slopes = np.stack(np.broadcast_arrays(duz, duy[None, :, None], dux[None, None, :])).astype(np.float32)
        return self._slopes

    def jacobian(self, percent: float) -> np.ndarray:
        """Exact Jacobian determinant ``(Z, Y, X)`` of the pull map ``p -> p + u_k(p)`` of one phase on the base
        grid (> 0; > 1 where the tissue is squeezed, e.g. the lungs at exhale)."""
        s, h = self.states(percent)
        d = self._unit_slopes()
        return (1.0 + s * d[0]) * (1.0 + h * d[1]) * (1.0 + h * d[2])

    def phase(self, percent: int) -> dict[str, np.ndarray]:
        """Image (HU), lung/body masks and exact field of one phase on the base grid.

        The reference is pulled through the exact field; inside the lungs (weighted by the pulled lung
        occupancy) the density follows the motion's exact Jacobian, keeping the lungs' mass
        (:func:`respmotion.core.warp.mass_preserving_hu`, the law synthesis applies); then the noise is added."""
        from ..core.warp import mass_preserving_hu

        Z, Y, X = self._base32()
        u = self.field(percent)
        img, lung = self._sample_fine(self._fine_stack(), Z + u[0], Y + u[1], X + u[2])
        img = mass_preserving_hu(torch.from_numpy(img), torch.from_numpy(self.jacobian(percent)),
                                 torch.from_numpy(lung)).numpy()
        if self.noise_hu > 0:
            img += np.random.default_rng([self.seed, percent]).normal(0.0, self.noise_hu, img.shape).astype(np.float32)
        body = img > -500.0
        return {"image": img, "lung": (lung >= 0.5).astype(np.uint8), "body": body.astype(np.uint8), "dvf": u}

    def sliding_distance(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Signed in-plane distance (mm, first order) to the sliding interface (the rib cage's inner
        surface); < 0 inside the cavity."""
        p = self.p
        ax, ay = p.body_ax * p.cavity_scale, p.body_ay * p.cavity_scale
        yc = -0.08 * p.body_ay
        r = self._cavity_r(y, x)
        grad = np.sqrt((x / ax**2) ** 2 + ((y - yc) / ay**2) ** 2) / np.maximum(r, 1e-9)
        return (r - 1.0) / np.maximum(grad, 1e-12)

    def landmark_margin(self) -> float:
        """Distance (mm) from the sliding interface below which the stored field does not resolve the
        motion: within it the shear across the interface (``slide_width`` wide) is steeper than trilinear
        interpolation on this grid follows (up to ~3 mm at 16x64x64).  Two in-plane voxels + 4 widths."""
        return float(max(grid.to_mm(2.0, self.geometry.spacing[1:]))) + 4.0 * self.p.slide_width

    def motion_statistics(self) -> dict[str, Any]:
        """This patient's motion in the terms of the measured reference (``motion_reference``), on its uniform
        lung points (the ``lung_parenchyma`` landmarks, like DIR-Lab's evenly spread landmarks): amplitude (mean
        superior motion at 50 %, mm), mean (superior, posterior, lateral) mm, profiles per unit amplitude over the
        normalised lung position, the superior state per phase, the largest motion (mm) in the spine, the phase
        curve (end-exhale phase, exponent) and the hysteresis loop: the largest in-plane distance (mm) between a
        point's exhale and inhale positions at the same SI state (exhale phases 5 %, 10 %, ... before the peak)."""
        from ..anatomy.lung_frame import lateral_sign, lung_box, normalised
        from .motion_reference import profile_table

        ref = np.array([c for c, k in zip(self.landmarks_ref, self.landmark_kind) if k == "lung_parenchyma"])
        xyz = ref[:, ::-1]
        box = lung_box(xyz)
        d = self.move_points(50, ref) - ref  # z (superior), y (posterior), x (left) mm
        comp = np.stack([d[:, 0], d[:, 1], d[:, 2] * lateral_sign(xyz, box)], 1)
        amp = float(comp[:, 0].mean())
        states = {f"{k:02d}": float((self.move_points(k, ref)[:, 0] - ref[:, 0]).mean()) / amp for k in PHASES}
        p = self.p
        zz = np.linspace(-FOV_MM[0] / 2, FOV_MM[0] / 2, 16)
        ang, rad = np.meshgrid(np.linspace(0, 2 * math.pi, 12), np.linspace(0, SPINE_R, 5))  # the vertebral body
        sy, sx = SPINE_Y * p.body_ay + rad * np.sin(ang), rad * np.cos(ang)
        spine = self.displacement(50, zz[:, None, None], sy[None], sx[None])
        loop = max(float(np.linalg.norm((self.move_points(k, ref) - self.move_points(self.curve.same_si_state(k), ref)
                                         )[:, 1:], axis=1).max())
                   for k in np.arange(5.0, 100.0 * self.curve.peak, 5.0))
        return {"amplitude_mm": amp, "component_mean_mm": comp.mean(0).tolist(),
                "profiles": profile_table(normalised(xyz, box), comp / amp), "superior_state": states,
                "spine_max_mm": float(np.linalg.norm(spine, axis=0).max()), "end_exhale_phase": self.curve.peak,
                "curve_n": self.curve.n, "hysteresis_loop_mm": loop}

    def landmarks(self) -> dict[str, Any]:
        """Landmark positions (LPS mm) in every phase; kinds: nodule, vessel_bifurcation, chest_wall,
        lung_parenchyma, below_diaphragm.  Kept are the landmarks that stay 3 mm inside the field of view
        and farther than :meth:`landmark_margin` from the sliding interface (and from the edge of the static
        spine zone) in every phase, so that the
        stored fields move every stored landmark to its true position (to < 0.1 mm)."""
        ref = np.array(self.landmarks_ref)  # (N, 3) z,y,x mm == LPS (z, y, x) for identity direction
        fov_lo = np.array(self.geometry.index_to_world([0, 0, 0]))[::-1]
        fov_hi = np.array(self.geometry.index_to_world(np.array(self.geometry.shape) - 1))[::-1]
        margin = self.landmark_margin()
        per_phase = {}
        keep = np.ones(len(ref), bool)
        dist = self.sliding_distance(ref[:, 1], ref[:, 2])
        for k in PHASES:
            q = self.move_points(k, ref)
            keep &= np.all((q >= fov_lo + 3.0) & (q <= fov_hi - 3.0), axis=1)
            keep &= np.abs(self.sliding_distance(q[:, 1], q[:, 2])) > margin
            spine_r = np.sqrt(q[:, 2] ** 2 + (q[:, 1] - SPINE_Y * self.p.body_ay) ** 2)
            keep &= np.abs(spine_r - SPINE_STATIC_R) > margin  # the static spine's edge is a second interface
            per_phase[f"{k:02d}"] = q
        kinds = [k for k, m in zip(self.landmark_kind, keep) if m]
        return {
            "frame": "LPS mm (x, y, z)",
            "kind": kinds,
            "sliding_distance_mm": dist[keep].round(3).tolist(),  # signed distance to the rib cage, < 0 inside
            "sliding_width_mm": self.p.slide_width,
            "sliding_margin_mm": round(margin, 3),
            "in_lung": [bool(self._inside_lung(c)) for c, m in zip(ref, keep) if m],
            "phases": {k: v[keep][:, ::-1].round(6).tolist() for k, v in per_phase.items()},
        }


def make_patient(seed: int, shape: Sequence[int] = DEFAULT_SHAPE, noise_hu: float = 10.0,
                 phase_curve: str = "patient") -> Phantom:
    return Phantom(seed, shape, noise_hu, phase_curve)


# peak memory of writing one patient: bytes a voxel for each phase computed at once (measured at
# 32x128x128: 293 B/voxel with one thread, 537 with two)
BYTES_PER_VOXEL_THREAD = 300


def check_request(shape: Sequence[int], noise_hu: float, patients: int = 1, seed: int = 0,
                  phase_curve: str = "patient") -> tuple[int, int, int]:
    """Validate a phantom request; returns the shape as ``(z, y, x)`` ints.

    Raises ``ValueError`` (one line) for a shape that is not 3 positive sizes, a negative noise
    level, fewer than one patient, a negative seed or an unknown ``phase_curve``."""
    if phase_curve not in PHASE_CURVES:
        raise ValueError(f"phantom phase_curve must be one of {', '.join(PHASE_CURVES)}, got {phase_curve!r}")
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"phantom shape must be 3 positive sizes z,y,x, got {','.join(map(str, shape))}")
    if not math.isfinite(noise_hu) or noise_hu < 0:
        raise ValueError(f"phantom noise_hu must be >= 0 HU (a standard deviation), got {noise_hu:g}")
    if patients < 1:
        raise ValueError(f"phantom patients must be >= 1, got {patients}")
    if seed < 0:
        raise ValueError(f"phantom seed must be >= 0, got {seed}")
    return shape  # type: ignore[return-value]


def check_memory(shape: Sequence[int], parallel: int) -> None:
    """Refuse (``MemoryError`` with the numbers) a request the machine cannot hold, before allocating."""
    check_allocation("phantom", shape, BYTES_PER_VOXEL_THREAD * parallel, f"{parallel} phase(s) at once")


def write_patient(out: str | Path, patient_id: str, seed: int, shape: Sequence[int] = DEFAULT_SHAPE,
                  noise_hu: float = 10.0, threads: int = 2, phase_curve: str = "patient") -> StudyDir:
    """Write one phantom patient (one study) in the cohort layout; skips a complete study.

    ``threads``: phases computed and written concurrently (numpy and torch release the GIL in the
    heavy loops); the files do not depend on it.  The completion marker is written last.  Use
    :func:`write_cohort` for a whole output folder (it owns the folder, see :mod:`respmotion.io.ownership`)."""
    from concurrent.futures import ThreadPoolExecutor

    shape = check_request(shape, noise_hu, 1, seed, phase_curve)
    sd = StudyDir(Path(out) / patient_id / "study_0")
    if sd.is_complete():
        return sd
    if sd.path.exists():  # an interrupted writer's temporary files (the folder's owner lock excludes a live one)
        clean_stale_tmp(sd.path)
    ph = make_patient(seed, shape, noise_hu, phase_curve)
    g = ph.geometry
    Z, Y, X = ph.base_coords()
    unit_z = ph._unit_field()[0].astype(np.float64)  # cached shared inputs, built before the threads start
    ph._fine_stack()
    ph._base32()

    def one_phase(k: int) -> None:
        d = ph.phase(k)
        meta = {"patient": patient_id, "phase_percent": k, "source": "phantom", "seed": seed, "units": "HU"}
        sd.save_phase(k, Volume(d["image"], g, meta))
        write_npy(sd.mask_path("lung", k), d["lung"])
        write_npy(sd.mask_path("body", k), d["body"])
        sd.save_gt("ref", k, DisplacementField(d["dvf"], g, {"from": "phase_00", "to": f"phase_{k:02d}"}))
        del d
        # exact consecutive-phase field: x + t_k(x) = phi_k^-1(phi_{k+1}(x))
        k1 = next_phase(k)
        u1 = ph.field(k1).astype(np.float64)  # the stored ref field of phase k+1
        s0, h0 = ph.states(k)
        tz = Z + u1[0]
        # y (x) of the target depends on y (x) only: solve those on one line; z with the per-component states.
        # start Newton at the first-order solution q ~ x + (s_k+1 - s_k) U(x): 2-3 steps to 1e-6 mm
        q = ph._solve_inverse(s0, h0, tz, (Y + u1[1])[:1, :, :1], (X + u1[2])[:1, :1, :], tol=1e-6,
                              z0=tz - s0 * unit_z)
        t = np.stack([q[..., 0] - Z, q[..., 1] - Y, q[..., 2] - X]).astype(np.float32)
        sd.save_gt("step", k, DisplacementField(t, g, {"from": f"phase_{k:02d}", "to": f"phase_{k1:02d}"}))

    if threads <= 1:
        for k in PHASES:
            one_phase(k)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(one_phase, k) for k in PHASES]:
                f.result()  # an error in any phase is raised here, before the study is marked complete
    write_json(sd.landmarks_path, ph.landmarks())
    p = ph.p
    nod_traj = {f"{k:02d}": [c[::-1].tolist() for c in ph.move_points(k, np.array([n[0] for n in ph.nodules]))] for k in PHASES}
    sd.mark_complete({
        "patient": patient_id, "study": "study_0", "phases": list(PHASES), "source": "phantom", "seed": seed,
        "reference_phase": 0, "geometry": g.to_dict(),
        "motion": {"diaphragm_si_excursion_mm": p.amp_si, "ap_excursion_mm": p.amp_ap, "lr_excursion_mm": p.amp_lr,
                   "end_exhale_phase": ph.curve.peak, "phase_curve_n": ph.curve.n, "hysteresis_eta": ph.curve.eta},
        "nodules": [{"center_lps_mm_phase00": n[0][::-1].tolist(), "radius_mm": n[1]} for n in ph.nodules],
        "nodule_trajectory_lps_mm": nod_traj,
    })
    return sd


def write_cohort(out: str | Path, patients: int, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE,
                 noise_hu: float = 10.0, progress: bool = False, workers: int = 1,
                 overwrite: bool = False, phase_curve: str = "patient") -> list[StudyDir]:
    """Write ``patients`` phantom patients ``phantom_000``... (patient i uses seed ``seed * 1000 + i``).

    ``phase_curve``: ``"patient"`` (each patient breathes on its own curve) or ``"population"`` (all on the
    reference's curve), :data:`PHASE_CURVES`.  ``workers`` > 1 writes patients in parallel processes, the cores
    left to each run its phases in threads; the result does not depend on either.  Measured on 2 cores at
    50x256x256: one process (2 threads) 11.7 s a patient, two processes 13 s a patient (each imports torch).

    The request is checked first (sizes, noise, memory: ``ValueError`` / ``MemoryError`` before
    anything is allocated or written).  ``out`` is owned (:func:`respmotion.io.ownership.claim`):
    a rerun with the same patients/seed/shape/noise resumes, another one is refused unless
    ``overwrite`` (which empties ``out`` first), and a second process writing ``out`` is refused."""
    from ..io.ownership import claim

    shape = check_request(shape, noise_hu, patients, seed, phase_curve)
    if workers < 1:
        raise ValueError(f"phantom workers must be >= 1, got {workers}")
    procs = min(workers, patients) if workers > 1 else 1
    threads = max(1, min(4, (os.cpu_count() or 1) // procs))  # phases of a patient in threads (see write_patient)
    check_memory(shape, procs * threads)
    identity = {"patients": patients, "seed": seed, "shape": list(shape), "noise_hu": float(noise_hu)}
    if phase_curve != "patient":  # absent for the default: folders written before the option keep their identity
        identity["phase_curve"] = phase_curve
    with claim(out, "phantom", identity, overwrite=overwrite):
        return _write_jobs(out, patients, seed, shape, noise_hu, progress, workers, threads, phase_curve)


def _write_jobs(out: str | Path, patients: int, seed: int, shape: tuple[int, int, int], noise_hu: float,
                progress: bool, workers: int, threads: int, phase_curve: str) -> list[StudyDir]:
    """The patients of :func:`write_cohort` (its checks and folder claim done)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from tqdm import tqdm

    jobs = [(out, f"phantom_{i:03d}", seed * 1000 + i, tuple(shape), noise_hu, threads, phase_curve)
            for i in range(patients)]
    bar = tqdm(total=len(jobs), desc="phantom", unit="patient", disable=not progress)
    studies = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                studies.append(write_patient(*job))
                bar.update()
        else:
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(write_patient, *job) for job in jobs]
                for f in futures:  # in patient order; an error in any worker is raised here
                    studies.append(f.result())
                    bar.update()
    finally:
        bar.close()  # also on an error: its message then starts on a line of its own
    return studies
