"""The HU window the networks see (documented once, recorded in every prepared phase's metadata).

Prepared volumes stay in Hounsfield units (float32).  Networks get
``x = 2 * (clip(HU, lo, hi) - lo) / (hi - lo) - 1`` in ``[-1, 1]`` with the default window
``(lo, hi) = (-1000, 1000)`` HU: air at -1, water at 0, dense bone and metal saturate at +1.
Lung parenchyma (about -900..-500 HU), vessels, soft tissue and the diaphragm edge, which carry
the breathing motion, stay inside the window.
"""

from __future__ import annotations

import numpy as np

HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)


def normalize_hu(hu: np.ndarray, window: tuple[float, float] = HU_WINDOW) -> np.ndarray:
    """HU -> [-1, 1] float32 (values outside the window are clipped)."""
    lo, hi = window
    if not hi > lo:
        raise ValueError(f"HU window must have hi > lo, got {window}")
    x = (np.clip(np.asarray(hu, dtype=np.float32), lo, hi) - lo) / (hi - lo)
    return (2.0 * x - 1.0).astype(np.float32)


def denormalize_hu(x: np.ndarray, window: tuple[float, float] = HU_WINDOW) -> np.ndarray:
    """[-1, 1] -> HU float32 (inverse of :func:`normalize_hu` inside the window)."""
    lo, hi = window
    return ((np.asarray(x, dtype=np.float32) + 1.0) * 0.5 * (hi - lo) + lo).astype(np.float32)
