"""The optimiser's regulariser per pair: bending energy and a Jacobian penalty at the control points, with the
bending weights of each pyramid level (``FFDSettings.bending_scale``) and of each knot (texture weights)."""

from __future__ import annotations

from dataclasses import replace

import torch

from .bspline import ControlGrid, knot_regulariser
from .config import FFDSettings


def per_level(values: tuple[float, ...], n_levels: int, li: int, empty: float) -> float:
    """Level ``li``'s entry of a per-level tuple aligned at the finest level (its last entry; levels coarser than
    the tuple reaches take its first entry; empty: ``empty``)."""
    if not values:
        return empty
    return float(values[max(0, len(values) - (n_levels - li))])


def bending_factor(s: FFDSettings, li: int) -> float:
    """Level ``li``'s factor on the bending weights (``s.bending_scale`` aligned at the finest level)."""
    return per_level(s.bending_scale, len(s.levels), li, 1.0)


def level_settings(s: FFDSettings, li: int) -> FFDSettings:
    """``s`` with level ``li``'s bending weights (:func:`bending_factor`); ``s`` itself where the factor is 1."""
    k = bending_factor(s, li)
    if k == 1.0:
        return s
    out = None if s.bending_weight_outside is None else s.bending_weight_outside * k
    return replace(s, bending_weight=s.bending_weight * k, bending_weight_outside=out)


def regulariser(grid: ControlGrid, coef: torch.Tensor, spacing, s: FFDSettings,
                knot_w: torch.Tensor | None = None) -> torch.Tensor:
    """Bending energy plus Jacobian penalty at the interior control points, per pair ``(B,)``.

    ``coef`` ``(B, 3, K...)`` mm or sliding ``(B, 2, 3, K...)`` (the outside field with
    ``s.bending_weight_outside``); ``spacing`` mm (z, y, x); ``knot_w`` ``(B, 1, K-2...)`` multiplies the bending
    weights per knot (both fields, or the outside one with ``s.texture_fields == "outside"``)."""
    if knot_w is None and (coef.ndim == 5 or s.bending_weight_outside is None):
        reg = knot_regulariser(coef.reshape(-1, 3, *grid.shape), grid, spacing, s.bending_weight,
                               s.jacobian_weight, s.jacobian_min)
        return reg.view(coef.shape[0], -1).sum(1)
    if coef.ndim == 5:
        return knot_regulariser(coef, grid, spacing, s.bending_weight * knot_w, s.jacobian_weight, s.jacobian_min)
    out = s.bending_weight if s.bending_weight_outside is None else s.bending_weight_outside
    inside_w = None if s.texture_fields == "outside" else knot_w
    return sum(knot_regulariser(coef[:, k], grid, spacing, w if kw is None else w * kw,
                                s.jacobian_weight, s.jacobian_min)
               for k, w, kw in ((0, s.bending_weight, inside_w), (1, out, knot_w)))
