"""The HU window the networks see (the one place it is written; recorded in every prepared phase's metadata).

Prepared volumes stay in Hounsfield units (float32).  Networks get
``x = 2 * (clip(HU, lo, hi) - lo) / (hi - lo) - 1`` in ``[-1, 1]`` with the default window
``(lo, hi) = (-1000, 1000)`` HU: air at -1, water at 0, dense bone and metal saturate at +1.
Lung parenchyma (about -900..-500 HU), vessels, soft tissue and the diaphragm edge, which carry
the breathing motion, stay inside the window.  The same window clips the images for SSIM / PSNR
(:mod:`respmotion.evaluation.metrics`).

Use: ``normalize_hu(ct_tensor)`` -> network units, ``denormalize_hu(y)`` -> HU (as
:meth:`respmotion.models.autoencoder.Autoencoder.normalize` / ``denormalize`` do with their config's window).
"""

from __future__ import annotations

import torch

HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)


def normalize_hu(hu: torch.Tensor, window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """HU -> [-1, 1] (values outside the window are clipped); any shape, dtype and device of ``hu``."""
    lo, hi = window
    if not hi > lo:
        raise ValueError(f"HU window must have hi > lo, got {window}")
    return 2.0 * (torch.clamp(hu, lo, hi) - lo) / (hi - lo) - 1.0


def denormalize_hu(x: torch.Tensor, window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """[-1, 1] -> HU (inverse of :func:`normalize_hu` inside the window)."""
    lo, hi = window
    return (x + 1.0) * 0.5 * (hi - lo) + lo
