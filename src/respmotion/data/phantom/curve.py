"""A phantom patient's breathing curve: the breathing states of each phase (:class:`BreathingCurve`).

The curve is the measured reference's asymmetric Lujan cos^2n curve
(:func:`respmotion.data.motion_reference.phase_state`, the one the anatomical prior uses) with a per-patient
end-exhale phase and exponent.  It gives, for a phase in percent of the cycle, the superior-inferior state ``s``
(0 at 00 = end-inhale, 1 at 50) and the AP/LR state ``h`` that lags ``s`` on exhale and leads it on inhale
(hysteresis).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..motion_reference import exponent_per_case, load_reference, phase_state

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
        pc = load_reference()["phase_curve"]
        return cls(float(pc["n"]), float(pc["peak"]), float(pc["eta"]))

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "BreathingCurve":
        """A patient's curve: ``peak`` uniform in :data:`PEAK_RANGE`; ``n`` log-normal with the mean and sd of
        log n over the DIR-Lab cases (each case's own exponent at its own end-exhale phase,
        :func:`~respmotion.data.motion_reference.exponent_per_case`), clipped to their range; ``eta`` the
        reference's (DIR-Lab median in-plane lag)."""
        pc = load_reference()["phase_curve"]
        log_n = np.log(exponent_per_case(pc))
        peak = rng.uniform(*PEAK_RANGE)
        n = float(np.exp(np.clip(rng.normal(log_n.mean(), log_n.std()), log_n.min(), log_n.max())))
        return cls(n, float(peak), float(pc["eta"]))

    @classmethod
    def for_patient(cls, seed: int, phase_curve: str = "patient") -> "BreathingCurve":
        """The curve of the phantom patient ``seed``: its own (:meth:`draw`, from a generator of its own,
        ``[seed, CURVE_STREAM]``, so that the anatomy and amplitude of a seed do not depend on it) or, for
        ``phase_curve="population"``, :meth:`population`."""
        if phase_curve == "patient":
            return cls.draw(np.random.default_rng([seed, CURVE_STREAM]))
        return cls.population()

    def states(self, percent: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(SI state ``s``, AP/LR state ``h``) of a phase in percent, both divided by ``s`` at 50 %: ``s`` is 0 at
        0 % (end-inhale) and exactly 1 at 50 % (where the amplitude is defined, as DIR-Lab's T00 -> T50), largest
        at ``peak``; ``h`` lags ``s`` on the exhale branch and leads it on the inhale branch when ``eta`` < 0."""
        s, h = phase_state(percent, self.n, self.peak, self.eta)
        s50 = phase_state(50.0, self.n, self.peak)[0]
        at50 = np.mod(np.asarray(percent, dtype=np.float64), 100.0) == 50.0
        return np.where(at50, 1.0, s / s50), h / s50

    def same_si_state(self, percent: float | np.ndarray) -> np.ndarray:
        """The inhale-branch phase (percent) with the same SI state as the exhale-branch phase ``percent``
        (0 <= percent <= 100 * peak): where a point's path would retrace itself without hysteresis."""
        x = np.asarray(percent, dtype=np.float64) / (100.0 * self.peak)
        return 100.0 * (1.0 - x * (1.0 - self.peak))
