"""The population model of real breathing motion, fitted to DIR-Lab 4D-CT landmarks and shipped with the package.

The model (``motion_reference.json`` inside the package, :func:`load_reference`; read by the phantom and the
anatomical prior; fitted and written by :mod:`respmotion.data.motion_reference_fit`, ``make motion-reference``):

* displacement at end-exhale ``d(n) = A * f(n)`` (mm; superior, posterior, lateral point motion from end-inhale),
  ``f`` a cubic polynomial (:func:`spatial_unit`) of the normalised position in the lung
  ``n = (n_si, n_ap, n_ml)`` in [0, 1] (apex -> base, anterior -> posterior, medial -> lateral) per unit
  amplitude ``A`` (mm: the mean superior displacement; without a given amplitude the median);
* breathing state per phase ``s(phi)`` (:func:`phase_state`): the asymmetric form of Lujan's ``cos^2n`` model
  (Lujan et al., Med. Phys. 26:715, 1999): ``1 - cos^2n(pi/2 * phi / phi_p)`` on the exhale branch up to the
  end-exhale phase ``phi_p`` and the mirror image on the inhale branch; hysteresis (Seppenwoolde et al., IJROBP
  53:822, 2002): the AP/LR components follow ``h = s + eta * s (1 - s)`` on the exhale branch and
  ``s - eta * s (1 - s)`` on the inhale branch.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

import numpy as np

FORMAT = "respmotion.motion_reference/1"
DEGREE = 3
COMPONENTS = ("superior", "posterior", "lateral")
SAMPLED_PHASES = (0, 10, 20, 30, 40, 50)
#: end-exhale phases searched: DIR-Lab's T50 is the extreme (maximum exhale) phase of its ten, so the
#: end-exhale lies within half a bin of 50 %; the phase curve is fitted on the exhale half only
PEAKS = np.round(np.arange(0.50, 0.5501, 0.01), 2)
PACKAGED = "motion_reference.json"


# ---------------------------------------------------------------------------- spatial model
def exponents(degree: int = DEGREE) -> list[tuple[int, int, int]]:
    """Monomial exponents of the polynomial basis in (n_si, n_ap, n_ml), total degree <= ``degree``."""
    return [(i, j, k) for i in range(degree + 1) for j in range(degree + 1) for k in range(degree + 1)
            if i + j + k <= degree]


def basis(n: np.ndarray, degree: int = DEGREE) -> np.ndarray:
    """``(..., 3)`` normalised coordinates -> ``(..., B)`` monomials (inputs centred at 0.5)."""
    c = np.asarray(n, dtype=np.float64) - 0.5
    return np.stack([c[..., 0] ** i * c[..., 1] ** j * c[..., 2] ** k for i, j, k in exponents(degree)], -1)


def spatial_unit(model: dict[str, Any], n: np.ndarray) -> np.ndarray:
    """``f(n)``: ``(..., 3)`` normalised positions -> ``(..., 3)`` (superior, posterior, lateral) per mm of
    amplitude (multiply by the amplitude in mm)."""
    return basis(n, int(model["degree"])) @ np.asarray(model["coef"]).T


# ---------------------------------------------------------------------------- phase curve
def lujan_branch(x: np.ndarray, n: float) -> np.ndarray:
    """``1 - cos^2n(pi/2 x)`` for ``x`` in [0, 1] (0 = end-inhale, 1 = end-exhale)."""
    return 1.0 - np.cos(0.5 * math.pi * np.clip(x, 0.0, 1.0)) ** (2.0 * n)


def phase_state(percent: float | np.ndarray, n: float, peak: float, eta: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Breathing state of a phase (percent of the cycle from end-inhale): ``(s, h)`` in [0, 1].

    ``s`` drives the superior-inferior motion, ``h`` the anterior-posterior and lateral motion (hysteresis
    ``eta``; ``h == s`` when ``eta`` is 0).  ``peak`` is the end-exhale phase as a fraction (0.5 = 50 %).
    Both are 0 at 0 % and 1 at ``peak``; the exhale branch rises, the inhale branch falls."""
    phi = np.mod(np.asarray(percent, dtype=np.float64) / 100.0, 1.0)
    exhale = phi <= peak
    x = np.where(exhale, phi / peak, (1.0 - phi) / (1.0 - peak))
    s = lujan_branch(x, n)
    h = s + np.where(exhale, 1.0, -1.0) * eta * s * (1.0 - s)
    return s, h


#: exponents ``n`` searched by the phase-curve fits
N_GRID = np.arange(0.5, 4.01, 0.05)


def fit_exhale(states: np.ndarray, ns: Sequence[float], peaks: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares fit of the exhale branch of :func:`phase_state` (normalised at T50) to one row of superior
    states at :data:`SAMPLED_PHASES`: ``(squared error, n, peak)``, the smallest ``n`` then ``peak`` on a tie."""
    pct = np.asarray(SAMPLED_PHASES, float)
    best = None
    for n in ns:
        for peak in peaks:
            s = phase_state(pct, float(n), float(peak))[0]
            err = float(((s / s[-1] - states) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, float(n), float(peak))
    return best


def exponent_per_case(phase_curve: dict[str, Any]) -> list[float]:
    """Each DIR-Lab case's own curve exponent ``n``: :func:`fit_exhale` of its superior states at its own
    end-exhale phase (``peak_per_case``) -- the spread of breathing-curve shapes the phantom draws from."""
    return [fit_exhale(np.asarray(row), N_GRID, [peak])[1]
            for row, peak in zip(phase_curve["superior_state_per_case"], phase_curve["peak_per_case"])]


# ---------------------------------------------------------------------------- profiles and the shipped reference
def profile_table(n: np.ndarray, d: np.ndarray, bins: int = 5) -> dict[str, Any]:
    """Bin means of ``d`` ``(N, 3)`` (superior, posterior, lateral per unit amplitude) over each column of the
    normalised positions ``n`` ``(N, 3)`` (``bins`` equal bins in [0, 1])."""
    edges = np.linspace(0, 1, bins + 1)
    out = {"bin_centres": (0.5 * (edges[1:] + edges[:-1])).tolist()}
    for a, axis in enumerate(("si", "ap", "ml")):
        idx = np.clip(np.digitize(n[:, a], edges) - 1, 0, bins - 1)
        out[axis] = {comp: [float(d[idx == b, j].mean()) if np.any(idx == b) else None for b in range(bins)]
                     for j, comp in enumerate(COMPONENTS)}
    return out


@lru_cache(maxsize=1)
def load_reference() -> dict[str, Any]:
    """The reference shipped inside the package (``respmotion/data/motion_reference.json``)."""
    return json.loads(resources.files("respmotion.data").joinpath(PACKAGED).read_text())


def reference_sha256() -> str:
    """sha256 of the shipped reference JSON (what ``make motion-reference`` writes)."""
    import hashlib

    return hashlib.sha256(resources.files("respmotion.data").joinpath(PACKAGED).read_bytes()).hexdigest()
