"""The optimiser's similarity: global normalised cross-correlation weighted by the fixed body mask, per pair."""

from __future__ import annotations

import torch


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair dot product of ``(B, N...)`` tensors -> ``(B,)`` (one BLAS call forward and backward)."""
    n = a.shape[0]
    return torch.bmm(a.reshape(n, 1, -1), b.reshape(n, -1, 1)).view(n)


class FixedStats:
    """Fixed-image side of the weighted NCC on one point set, computed once: ``fw = w (f - mean_w f)``,
    ``sum w`` and ``sum w (f - mean_w f)^2`` per pair.

    Args:
        f: fixed intensities at the points ``(B, ...)``.
        w: similarity weights at the same points ``(B, ...)`` (>= 0).
    """

    def __init__(self, f: torch.Tensor, w: torch.Tensor, eps: float = 1e-6):
        dims = tuple(range(1, f.ndim))
        self.w = w
        self.sw = w.sum(dims).clamp_min(eps)
        fc = f - ((w * f).sum(dims) / self.sw).view(-1, *(1,) * (f.ndim - 1))
        self.fw = (w * fc).contiguous()
        self.var = (self.fw * fc).sum(dims)

    def ncc(self, m: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Weighted NCC of the warped moving intensities ``m`` (same shape as ``f``) with the fixed ones, ``(B,)``:
        the value of :func:`respmotion.registration.quality.masked_ncc` (``sum w (f - mean f)(m - mean m) =
        sum fw m``) with 1 product and 3 dot products on the points instead of ~15 elementwise passes."""
        wm = self.w * m
        s1 = wm.flatten(1).sum(1)
        var_m = batch_dot(wm, m) - s1 * s1 / self.sw
        return batch_dot(self.fw, m) / torch.sqrt(self.var * var_m + eps)
