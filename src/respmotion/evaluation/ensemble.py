"""Scores of a generative motion model judged as a generator: K sampled fields against one truth.

A CT does not determine everything about how its patient breathes (the timing of a phase within the cycle
varies from breath to breath and patient to patient), so a motion model should be judged by the distribution
its samples form, not by one sample.  For K sampled fields ``X_1..X_K`` of one phase and the true field
``y`` (all ``(3, z, y, x)`` mm on one grid), with the distance ``d(a, b)`` = the mean over the lung voxels of
the end-point error ``|a(p) - b(p)|`` (mm, the same quantity as the project's "lung DVF error"):

* **single-sample error**: ``d(X_1, y)``;
* **K-sample mean error**: ``d(mean_i X_i, y)``;
* **energy score** (Gneiting & Raftery 2007, a proper scoring rule; lower is better):
  ``ES = 1/K sum_i d(X_i, y) - 1/(2 K (K - 1)) sum_{i != j} d(X_i, X_j)``.  ``d`` is an average of
  Euclidean norms, a metric of negative type, so the score is proper.  For a point forecast (K = 1, or K
  identical samples, e.g. the population-mean field) the second term is 0 and the score is its error;
* **spread**: the samples' standard deviation about their mean, ``sqrt(1/(K-1) sum_i |X_i - mean|^2)``
  averaged over the lung voxels (mm).  A calibrated generator's spread follows the K-sample mean's error
  (spread vs skill, phase by phase): a small spread where the mean errs much is overconfidence.

Use: ``ensemble_scores(samples, truth, lung)`` with ``samples`` ``(K, 3, z, y, x)``, ``truth`` ``(3, z, y, x)``
and a boolean ``lung`` ``(z, y, x)``; returns a dict of floats in mm.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ensemble_scores", "energy_score", "lung_distance"]


def lung_distance(a: np.ndarray, b: np.ndarray, lung: np.ndarray) -> float:
    """Mean over ``lung`` voxels of ``|a(p) - b(p)|``, ``a``/``b`` ``(3, z, y, x)`` mm -> mm."""
    return float(np.linalg.norm(a[:, lung] - b[:, lung], axis=0).mean())


def energy_score(samples: np.ndarray, truth: np.ndarray, lung: np.ndarray) -> float:
    """Energy score (mm) of ``samples`` ``(K, 3, z, y, x)`` against ``truth`` ``(3, z, y, x)`` in ``lung``."""
    k = samples.shape[0]
    skill = float(np.mean([lung_distance(x, truth, lung) for x in samples]))
    if k < 2:
        return skill
    pairs = [lung_distance(samples[i], samples[j], lung) for i in range(k) for j in range(i + 1, k)]
    return skill - 0.5 * float(np.mean(pairs))  # the mean over i < j equals the mean over i != j


def ensemble_scores(samples: np.ndarray, truth: np.ndarray, lung: np.ndarray) -> dict[str, float]:
    """Single-sample error, K-sample mean error, energy score and spread (all mm) of one phase's samples."""
    samples = np.asarray(samples, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    lung = np.asarray(lung, dtype=bool)
    if samples.ndim != 5 or samples.shape[1:] != truth.shape or truth.shape[1:] != lung.shape:
        raise ValueError(f"samples (K, 3, z, y, x), truth (3, z, y, x) and lung (z, y, x) must agree, got "
                         f"{samples.shape}, {truth.shape}, {lung.shape}")
    if not lung.any():
        raise ValueError("lung mask is empty")
    k = samples.shape[0]
    mean = samples.mean(0)
    spread = 0.0
    if k > 1:
        var = ((samples[:, :, lung] - mean[None][:, :, lung]) ** 2).sum(axis=(0, 1)) / (k - 1)
        spread = float(np.sqrt(var).mean())
    return {"single_sample_error": lung_distance(samples[0], truth, lung),
            "mean_error": lung_distance(mean, truth, lung),
            "energy_score": energy_score(samples, truth, lung),
            "spread": spread, "samples": int(k)}
