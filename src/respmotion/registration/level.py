"""One level of the optimiser's image pyramid: downsampled images and weights, basis matrices, point subsets and
the warped moving image at those points (the hot loop of :func:`respmotion.registration.ffd.register`).

A level of ``factor`` (z, y, x) has ``round(full / factor)`` voxels per axis over the same field of view.  The
similarity is evaluated on a dense sub-grid of its voxels (``offset::step`` per axis) inside the bounding box of the
batch's body weights: a weight-0 voxel adds nothing to the weighted NCC, so the crop leaves the loss unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core import warp as W
from ..core.filters import downsample_area
from ..core.geometry import level_positions, level_to_normalized
from .bspline import Basis, ControlGrid, evaluate
from .similarity import FixedStats


@dataclass
class Points:
    """The voxels one iteration looks at: level voxels ``offset::step`` inside the bounding box of the batch's
    body weights, a dense sub-grid ``(nz, ny, nx)`` shared by the pairs of the batch (gathering only the
    weight > 0 voxels of the box was slower)."""

    axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # level voxel indices of the sub-grid per axis (long)
    basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # basis rows of those indices ``(n_axis, K_axis)``
    base: torch.Tensor  # (nz, ny, nx, 3) grid_sample coordinate (x, y, z order, align_corners=True)
    fixed: torch.Tensor  # (B, nz, ny, nx)
    weight: torch.Tensor  # (B, nz, ny, nx)
    inside_weight: torch.Tensor | None  # (B, 1, nz, ny, nx) weight of the inside field (sliding) or None
    stats: FixedStats | None = None  # fixed-image side of the NCC on these points

    @property
    def size(self) -> int:
        return int(np.prod([a.numel() for a in self.axes]))


class SlidingBlend(torch.autograd.Function):
    """Sliding blend ``w * inside + (1 - w) * outside`` of ``t`` ``(B, 6, ...)`` (inside = channels 0-2) with the
    inside field's weight ``w`` ``(B, 1, ...)``; backward writes the two gradients into one preallocated tensor
    (cheaper than autograd through slices or a product with stacked weights)."""

    @staticmethod
    def forward(ctx, t, w):
        ctx.save_for_backward(w)
        inner, outer = t[:, :3], t[:, 3:]
        return torch.addcmul(outer, w, inner - outer)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        g = g.contiguous()  # arrives channels-last from grid_sample; the basis products need (B, 6, ...) rows
        out = torch.empty((g.shape[0], 6, *g.shape[2:]), dtype=g.dtype, device=g.device)
        torch.mul(g, w, out=out[:, :3])
        torch.sub(g, out[:, :3], out=out[:, 3:])
        return out, None


class Level:
    """Everything one pyramid level needs: images, weights, basis matrices, grid mapping, point subsets.

    Args:
        fixed, moving: full-resolution images ``(B, 1, Z, Y, X)`` (clipped HU).
        weight: similarity weight ``(B, 1, Z, Y, X)`` (the fixed body mask).
        factor: downsampling per axis (z, y, x) of this level.
        grid: the control grid over the full-resolution ``(Z, Y, X)`` voxels.
        spacing: full-resolution voxel size, mm (z, y, x).
        inside_weight: sliding only: the inside field's weight ``(B, Z, Y, X)`` in [0, 1].
    """

    def __init__(self, fixed, moving, weight, factor, grid: ControlGrid, spacing, device, dtype,
                 inside_weight: torch.Tensor | None = None):
        full = grid.image_shape
        self.shape = tuple(max(1, int(round(n / f))) for n, f in zip(full, factor))
        self.fixed = downsample_area(fixed, self.shape)[:, 0]  # (B, z, y, x)
        self.moving = downsample_area(moving, self.shape)  # (B, 1, z, y, x)
        self.weight = downsample_area(weight, self.shape)[:, 0]
        self.inside_weight = (None if inside_weight is None
                              else downsample_area(inside_weight.to(dtype)[:, None], self.shape)[:, 0])
        pos = [level_positions(n, m) for n, m in zip(full, self.shape)]
        self.pos = [torch.as_tensor(p, dtype=dtype, device=device) for p in pos]
        self.basis = [torch.as_tensor(b, dtype=dtype, device=device) for b in
                      (Basis(grid, pos).matrix(a) for a in range(3))]
        # grid_sample coordinate of full-resolution index p on this level: a * p + b per axis
        a, b = zip(*(level_to_normalized(n, m) for n, m in zip(full, self.shape)))
        self.a = torch.as_tensor(a, dtype=dtype, device=device)
        self.b = torch.as_tensor(b, dtype=dtype, device=device)
        # mm along (z, y, x) -> grid_sample units along (x, y, z): applied to the control points (the field is
        # linear in them), so the hot loop evaluates grid offsets directly
        self.mm_to_grid = W.mm_to_normalized(self.a, spacing)
        active = self.weight.amax(0) > 0  # (z, y, x) union over the batch
        if bool(active.any()):
            nz = active.nonzero()
            self.lo = [int(v) for v in nz.amin(0)]
            self.hi = [int(v) + 1 for v in nz.amax(0)]
        else:  # no weight anywhere: NCC is 0 whatever the field; keep the whole grid
            self.lo, self.hi = [0, 0, 0], list(self.shape)
        self._points: dict[tuple, Points] = {}

    def points(self, offset: Sequence[int], step: Sequence[int]) -> Points:
        """Point subset for level voxels ``offset::step`` per axis (z, y, x) (cached)."""
        key = (tuple(int(o) for o in offset), tuple(int(s) for s in step))
        if key not in self._points:
            dev = self.fixed.device
            axes = []
            for ax, (o, st) in enumerate(zip(*key)):
                start = self.lo[ax] + (o - self.lo[ax]) % st
                axes.append(torch.arange(start, self.hi[ax], st, device=dev))
            coords = [self.pos[ax][axes[ax]] * self.a[ax] + self.b[ax] for ax in range(3)]
            base = torch.stack(torch.meshgrid(coords[2], coords[1], coords[0], indexing="xy"), -1)  # (y, x, z, 3)
            base = base.permute(2, 0, 1, 3).contiguous()  # (z, y, x, 3) in (x, y, z) order
            sl = [slice(int(a[0]), int(a[-1]) + 1, st) for a, st in zip(axes, key[1])]
            take = lambda t: t[:, sl[0], sl[1], sl[2]].contiguous()  # noqa: E731
            f, w = take(self.fixed), take(self.weight)
            inside = None if self.inside_weight is None else take(self.inside_weight)[:, None]
            self._points[key] = Points(tuple(axes), tuple(self.basis[ax][axes[ax]] for ax in range(3)), base, f, w,
                                       inside, FixedStats(f, w))
        return self._points[key]

    def displacement(self, coef: torch.Tensor, pts: Points) -> torch.Tensor:
        """The field at the points ``(B, 3, nz, ny, nx)`` (components z, y, x; the units of ``coef``).  ``coef``
        ``(B, 3, K...)`` or sliding ``(B, 2, 3, K...)`` (inside, outside; blended with the level's inside
        weight)."""
        nb = coef.shape[0]
        t = evaluate(coef.reshape(nb, -1, *coef.shape[-3:]), *pts.basis)  # (B, 3 or 6, nz, ny, nx)
        if coef.ndim == 5:
            return t
        if pts.inside_weight is None:
            raise ValueError("sliding control points need the level built with the inside field's weight")
        return SlidingBlend.apply(t, pts.inside_weight)

    def sample(self, coef: torch.Tensor, pts: Points) -> torch.Tensor:
        """Warped moving image at the points ``(B, nz, ny, nx)`` for control points ``coef`` in mm (``pts.fixed``,
        ``pts.weight`` are the matching fixed values and weights).  Same field as :meth:`displacement`, scaled to
        grid units on the control points."""
        view = (1,) * (coef.ndim - 4) + (3, 1, 1, 1)
        off = self.displacement(coef.flip(-4) * self.mm_to_grid.view(view), pts)  # (B, 3, ...) x, y, z grid units
        grid = pts.base + off.permute(0, 2, 3, 4, 1)
        warped = F.grid_sample(self.moving, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return warped[:, 0]
