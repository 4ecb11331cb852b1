"""Folding repair of finished registrations: no voxel with a Jacobian determinant <= 0 as the evaluation measures it.

The optimiser's Jacobian penalty acts at the control points only, and the sliding blend changes quickly at the
region's surface, so a few voxels of a finished field may fold.  :func:`repair_folding` computes the dense field's
determinant exactly as :func:`respmotion.core.warp.jacobian_determinant` does and pushes the offending voxels'
determinants up with bounded gradient steps on the control points until none is folded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core import warp as W
from .bspline import Basis, ControlGrid, evaluate_points, point_weights

FOLD_TOL = 1e-3  # float32 determinants at or below this count as folded: core's float64 det of the rest is > 0


class FoldingProbe:
    """Jacobian determinant at full-resolution voxels ``vox`` ``(M, 3)`` (long, z, y, x) computed as
    :func:`respmotion.core.warp.jacobian_determinant` computes it on the dense field (central differences,
    one-sided at the image border), differentiable in the control points: ``(3, K...)`` mm, or sliding
    ``(2, 3, K...)`` with the inside field's weight ``inside_weight`` ``(Z, Y, X)`` choosing the field per voxel."""

    def __init__(self, grid: ControlGrid, inside_weight: torch.Tensor | None, spacing, vox: torch.Tensor):
        shape = grid.image_shape
        q, h = [], []
        for d in range(3):
            hi, lo = vox.clone(), vox.clone()
            hi[:, d] = (vox[:, d] + 1).clamp(max=shape[d] - 1)
            lo[:, d] = (vox[:, d] - 1).clamp(min=0)
            q += [hi, lo]
            h.append((hi[:, d] - lo[:, d]).clamp(min=1))
        q = torch.cat(q)  # (6M, 3): +z, -z, +y, -y, +x, -x neighbours
        self.m = vox.shape[0]
        self.flat, self.weights = point_weights(grid, q.to(torch.float64))
        self.inside = None if inside_weight is None else inside_weight[q[:, 0], q[:, 1], q[:, 2]].to(torch.float32)
        self.scale = W.mm_to_voxel_gradient(spacing, torch.stack(h).to(torch.float32))  # (comp, dir, M)

    def __call__(self, coef: torch.Tensor) -> torch.Tensor:
        u = evaluate_points(coef.reshape(-1, *coef.shape[-3:]), self.flat, self.weights)  # (3 or 6, 6M)
        if coef.ndim == 4 + 1:
            u = self.inside * u[:3] + (1.0 - self.inside) * u[3:]
        u = u.view(3, 3, 2, self.m)  # (component, direction, +/-, M)
        g = (u[:, :, 0] - u[:, :, 1]) * self.scale  # d u_c / d p_d in voxels
        return W.det3([[g[c, d] + (1.0 if c == d else 0.0) for d in range(3)] for c in range(3)])


def determinant_box(coef: torch.Tensor, grid: ControlGrid, inside_weight: torch.Tensor | None, spacing,
                    lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """Jacobian determinant (:func:`respmotion.core.warp.jacobian_determinant` in float32) of the dense field of
    ``coef`` (one pair, ``(3, K...)`` or sliding ``(2, 3, K...)`` mm) on the voxel box ``[lo, hi)``, equal to the
    full-grid values there: the field is evaluated with a one-voxel margin (dropped) so central differences see
    the same neighbours; at the image border both are one-sided."""
    n = grid.image_shape
    elo = [max(a - 1, 0) for a in lo]
    ehi = [min(b + 1, m) for b, m in zip(hi, n)]
    basis = Basis(grid, [np.arange(a, b, dtype=np.float64) for a, b in zip(elo, ehi)], coef.device, coef.dtype)
    if coef.ndim == 4:
        u = basis.field(coef[None])
    else:
        w = inside_weight[elo[0]:ehi[0], elo[1]:ehi[1], elo[2]:ehi[2]].to(coef.dtype)[None, None]
        u = w * basis.field(coef[0][None]) + (1.0 - w) * basis.field(coef[1][None])
    det = W.jacobian_determinant(u.to(torch.float32), spacing, dtype=torch.float32)[0]
    return det[tuple(slice(a - e, b - e) for a, b, e in zip(lo, hi, elo))]


def repair_folding(coef: torch.Tensor, grid: ControlGrid, spacing, inside_weight: torch.Tensor | None = None,
                   detect: float = 0.1, target: float = 0.25, rounds: int = 20, steps: int = 60,
                   step_mm: float = 0.1) -> tuple[torch.Tensor, list[dict]]:
    """Remove folding from finished registrations: ``coef`` ``(B, 3, K...)`` or sliding ``(B, 2, 3, K...)`` mm on
    ``grid``, ``spacing`` mm (z, y, x), sliding: ``inside_weight`` ``(B, Z, Y, X)``.

    Per pair: the dense field's Jacobian determinant (:func:`determinant_box`) is computed; if any voxel has
    det <= 0, the voxels with det < ``detect`` join a set whose determinants are pushed above ``target`` (gradient
    steps on the squared hinge, at most ``step_mm`` per control point and step, ``steps`` per round, evaluated at
    those voxels with :class:`FoldingProbe`); repeated until the dense check finds no det <= 0.  Sliding: the rounds
    move the outside field only (the inside field, hence the lung error, untouched) until one of them fails to
    reduce the folded voxels, or half the rounds are spent; then both fields.  Pairs without folding are returned
    unchanged.  Returns the control points and one record per pair.
    """
    out = coef.detach().clone()
    records = []
    for b in range(coef.shape[0]):
        wb = None if inside_weight is None else inside_weight[b].to(coef.dtype)
        rec = {"folded_before": 0, "rounds": 0, "voxels": 0, "folded_after": 0, "max_change_mm": 0.0}
        start = out[b].clone()
        active = None
        det = None
        outside_first = coef.ndim == 6  # sliding: move the outside field first (lung error untouched) ...
        prev_fold = None
        for r in range(rounds + 1):
            with torch.no_grad():
                if det is None:
                    det = determinant_box(out[b], grid, wb, spacing, (0, 0, 0), grid.image_shape)
                else:  # only the voxels under moved control points can change
                    moved = ((out[b] - before).abs().reshape(-1, *grid.shape).amax(0) > 0).nonzero()
                    if moved.numel():
                        st = torch.as_tensor(grid.stride, dtype=torch.float64)
                        # support of control point k: voxels in ((k - 3) s, (k + 1) s); +-1 voxel for the differences
                        lo = [max(int(v), 0) for v in torch.floor((moved.amin(0) - 3) * st)]
                        hi = [min(int(v) + 1, m)
                              for v, m in zip(torch.ceil((moved.amax(0) + 1) * st), grid.image_shape)]
                        det[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = determinant_box(out[b], grid, wb, spacing, lo, hi)
            n_fold = int((det <= FOLD_TOL).sum())
            if r == 0:
                rec["folded_before"] = n_fold
            rec["folded_after"] = n_fold
            if n_fold == 0 or r == rounds:
                break
            if prev_fold is not None and n_fold >= prev_fold:
                outside_first = False  # ... until a round of it leaves as many folded voxels as before
            outside_first = outside_first and r < rounds // 2
            prev_fold = n_fold
            new = (det < detect).nonzero()
            active = new if active is None else torch.unique(torch.cat([active, new]), dim=0)
            rec["rounds"], rec["voxels"] = r + 1, int(active.shape[0])
            before = out[b].clone()
            cb = out[b].clone().requires_grad_(True)
            probe = FoldingProbe(grid, wb, spacing, active)
            for _ in range(steps):
                dj = probe(cb)
                if float(dj.detach().min()) >= target:
                    break
                (grad,) = torch.autograd.grad((F.relu(target - dj) ** 2).sum(), cb)
                if outside_first:
                    grad[0] = 0.0
                with torch.no_grad():  # gradient step scaled to move no control point more than step_mm
                    cb -= grad * (step_mm / grad.abs().max().clamp_min(1e-12))
            out[b] = cb.detach()
        rec["max_change_mm"] = float((out[b] - start).abs().max())
        records.append(rec)
    return out, records
