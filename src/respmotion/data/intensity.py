"""The HU window: the one type (:data:`HUWindow`) and default (:data:`HU_WINDOW`) of every "clip CT to these HU" setting.

Every config that clips CT values names the setting ``hu_window`` and types it :data:`HUWindow`: the
autoencoders' network units (``model.hu_window``), registration's similarity (``ffd.hu_window``), the
image metrics and the prepared phases' metadata.  (A display window, :class:`respmotion.viz.config.RenderConfig`
``display_window_hu``, only colours pixels; the research checkpoints' own window is
:data:`respmotion.synthesis.seed.RESEARCH_HU_WINDOW`.)

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

#: an HU window ``(low, high)``, low < high: CT values are clipped to it
HUWindow = tuple[float, float]
#: the default window (network units, registration's similarity, the image metrics)
HU_WINDOW: HUWindow = (-1000.0, 1000.0)


def check_hu_window(window: HUWindow, name: str = "hu_window") -> HUWindow:
    """``window`` as a ``(low, high)`` float pair; a ``ValueError`` naming ``name`` unless low < high."""
    lo, hi = (float(v) for v in window)
    if not hi > lo:
        raise ValueError(f"{name} must be (low, high) HU with low < high, got {tuple(window)}")
    return lo, hi


def normalize_hu(hu: torch.Tensor, window: HUWindow = HU_WINDOW) -> torch.Tensor:
    """HU -> [-1, 1] (values outside the window are clipped); any shape, dtype and device of ``hu``."""
    lo, hi = check_hu_window(window)
    return 2.0 * (torch.clamp(hu, lo, hi) - lo) / (hi - lo) - 1.0


def denormalize_hu(x: torch.Tensor, window: HUWindow = HU_WINDOW) -> torch.Tensor:
    """[-1, 1] -> HU (inverse of :func:`normalize_hu` inside the window)."""
    lo, hi = window
    return (x + 1.0) * 0.5 * (hi - lo) + lo
