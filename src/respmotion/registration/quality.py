"""Quality record of one registered pair: similarity before/after and Jacobian folding."""

from __future__ import annotations

from typing import Sequence

import torch

from ..core import warp as W


def masked_ncc(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weighted global normalised cross-correlation per pair: ``(B, ...)`` tensors -> ``(B,)``."""
    dims = tuple(range(1, a.ndim))
    a, b, w = a.double(), b.double(), weight.double()
    sw = w.sum(dims, keepdim=True).clamp_min(eps)
    ac = a - (w * a).sum(dims, keepdim=True) / sw
    bc = b - (w * b).sum(dims, keepdim=True) / sw
    return (w * ac * bc).sum(dims) / torch.sqrt((w * ac * ac).sum(dims) * (w * bc * bc).sum(dims) + eps)


def quality_record(fixed: torch.Tensor, moving: torch.Tensor, body: torch.Tensor, field_mm: torch.Tensor,
                   spacing: Sequence[float]) -> dict:
    """``fixed``, ``moving``, ``body`` ``(Z, Y, X)``; ``field_mm`` ``(3, Z, Y, X)`` pull field.

    Returns NCC (fixed body mask) before/after, % voxels with Jacobian determinant <= 0 (whole grid and body),
    minimum Jacobian determinant (finite differences, :func:`respmotion.core.warp.jacobian_determinant`).
    """
    warped = W.warp(moving[None, None].float(), field_mm[None].float(), spacing)[0, 0]
    w = body.float()[None]
    det = W.jacobian_determinant(field_mm[None], spacing)[0]
    inside = body.bool()
    return {
        "ncc_before": float(masked_ncc(fixed[None], moving[None], w)[0]),
        "ncc_after": float(masked_ncc(fixed[None], warped[None], w)[0]),
        "folding_percent": 100.0 * float((det <= 0).float().mean()),
        "folding_percent_body": 100.0 * float((det[inside] <= 0).float().mean()) if inside.any() else 0.0,
        "jacobian_min": float(det.min()),
        "jacobian_max": float(det.max()),
        "max_displacement_mm": float(field_mm.norm(dim=0).max()),
    }
