"""A phantom patient's parameters: field of view, calibration constants, tissue HU, the random draw of one
patient's body and breathing amplitudes (:class:`PhantomParams`) and the body surfaces that the anatomy and the
motion share (rib cage, diaphragm).

Coordinates are LPS mm ``(z, y, x)`` centred on the field of view; ``y`` grows towards the posterior, ``x``
towards the patient's left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from ..motion_reference import load_reference

FOV_MM = (150.0, 358.4, 358.4)  # z, y, x field of view
DEFAULT_SHAPE = (50, 256, 256)
EXT_BELOW_MM, EXT_ABOVE_MM = 36.0, 12.0  # mm of anatomy drawn beyond the FOV (motion pulls from there)

#: motion shape, calibrated on the DIR-Lab reference (docs/motion.md): AP and lateral excursion per mm of mean
#: superior lung motion; SI motion gain from anterior to posterior and from medial to lateral (linear, x 1 at the
#: cavity's centre line), and the exponent of the SI profile from the diaphragm (t = 0) to the apex (t = 1).
AP_PER_SI, LR_PER_SI = 0.2, 0.25
SI_AP_GAIN, SI_ML_GAIN, SI_PROFILE_EXP = 1.6, 1.0, 1.5

SPINE_Y, SPINE_R = 0.72, 17.0  # vertebral body centre (x body_ay, posterior) and radius, mm
SKIN_DEPTH_MM = 6.0  # chest-wall landmarks stay at least this deep under the skin (at end-inhale)
SPINE_STATIC_R = 26.0  # mm: SI motion fades out (over slide_width) this far from the spine's axis (< 1 mm inside)

HU_AIR, HU_LUNG, HU_FAT, HU_SOFT, HU_BLOOD, HU_LIVER, HU_BONE = -1000.0, -860.0, -100.0, 40.0, 45.0, 60.0, 650.0


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
        :data:`LR_PER_SI`) that grow with the chest's depth and width.  ``amp_si`` starts at the mean superior
        motion; :class:`~respmotion.data.phantom.Phantom` rescales it once the lungs are drawn."""
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
            amp_si=mean_si,
            amp_ap=mean_si * AP_PER_SI * (0.8 + 0.4 * (body_ay - 105.0) / 17.0),
            amp_lr=mean_si * LR_PER_SI * (0.8 + 0.4 * (body_ax - 150.0) / 18.0),
            lr_asym=(right_offset - 8.0) / 30.0,
            abdomen_decay=rng.uniform(70, 80),
            slide_width=2.0,
        )

    # ------------------------------------------------------------------ body surfaces
    def cavity_r(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Normalised elliptic radius of the rib cage's inner surface at (y, x) mm (1 on the surface, < 1 inside)."""
        ax, ay = self.body_ax * self.cavity_scale, self.body_ay * self.cavity_scale
        yc = -0.08 * self.body_ay  # cavity slightly anterior: the spine stays outside it
        return np.sqrt((x / ax) ** 2 + ((y - yc) / ay) ** 2)

    def dome(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """z (mm) of the diaphragm surface at (y, x) mm at end-inhale: two domes, the right one higher."""
        cx = 0.45 * self.body_ax * self.cavity_scale
        r2 = (((np.abs(x) - cx) / (0.55 * self.body_ax * self.cavity_scale)) ** 2
              + ((y + 0.05 * self.body_ay) / (0.8 * self.body_ay)) ** 2)
        right = 1.0 / (1.0 + np.exp(x / 15.0))  # smooth step: LPS -x is the patient's right
        return self.dome_z + self.dome_height * np.exp(-1.5 * r2) + self.right_dome_offset * right

    def sliding_distance(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Signed in-plane distance (mm, first order) from (y, x) mm to the sliding interface (the rib cage's
        inner surface); < 0 inside the cavity."""
        ax, ay = self.body_ax * self.cavity_scale, self.body_ay * self.cavity_scale
        yc = -0.08 * self.body_ay
        r = self.cavity_r(y, x)
        grad = np.sqrt((x / ax**2) ** 2 + ((y - yc) / ay**2) ** 2) / np.maximum(r, 1e-9)
        return (r - 1.0) / np.maximum(grad, 1e-12)

    def chest_wall_radius(self, angle: float) -> float:
        """Largest cavity radius (in cavity radii, along ``angle`` (radians) from the cavity's centre, as the
        chest-wall landmarks are placed) that stays :data:`SKIN_DEPTH_MM` inside the body surface: a landmark
        beyond the skin would lie in air, where no image tells where it moved."""
        u = self.cavity_scale * math.cos(angle)  # x / body_ax per cavity radius
        v = self.cavity_scale * math.sin(angle)  # (y - yc) / body_ay per cavity radius
        w = -0.08  # yc / body_ay
        t = 1.0 - SKIN_DEPTH_MM / min(self.body_ax, self.body_ay)  # body radius to stay within
        # (r u)^2 + (r v + w)^2 = t^2, the positive root
        a2, b = u * u + v * v, v * w
        return float((-b + math.sqrt(b * b - a2 * (w * w - t * t))) / a2)
