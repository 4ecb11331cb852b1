"""Batched cubic B-spline free-form deformation (FFD) registration in plain torch.

``register(fixed, moving, body, spacing, settings)`` registers B pairs at once (one tensor; each pair has its
own control points and its own loss term, so the pairs do not interact): it finds control points ``c`` such
that ``moving(p + u(p)) ~= fixed(p)`` for ``p`` in the fixed body mask, ``u`` in mm on the fixed grid (pull).

Method (one control lattice, refined image pyramid, as hf-deepali's FFD set-up of SPEC section 7):

* similarity: global normalised cross-correlation weighted by the fixed body mask (area-downsampled to soft
  weights on coarse levels);
* regulariser: bending energy of ``u`` (mm^-2) at the control points plus a penalty on the Jacobian
  determinant below ``jacobian_min`` (keeps the map invertible: 0 % folding in the measurements);
* Adam on the control points (mm), a few levels from coarse to full resolution;
* at the finest level(s) the similarity is evaluated on a strided subset of the voxels (``subsample``) whose
  offset changes every iteration: every voxel contributes over a few iterations and the images keep their full
  resolution (unlike halving the images, SPEC section 7: 0.53 mm), at a fraction of the grid-sampling cost.

Optional sliding (``sliding=True``): two fields, one used inside the fixed lung mask (smoothed to a soft
weight) and one outside, each with its own regulariser, so the lung may slide along the chest wall.

Measured evidence for the choice of engine and settings is in :mod:`respmotion.registration` (package doc).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .bspline import Basis, ControlGrid, bending_energy_knots, evaluate, jacobian_knots, level_positions


@dataclass
class FFDSettings:
    """Optimiser settings (defaults: the measured best; see the package docstring)."""

    stride: tuple[float, float, float] = (3.0, 8.0, 8.0)  # control point spacing, full-res voxels (z, y, x)
    levels: tuple[tuple[int, int, int], ...] = ((4, 4, 4), (2, 2, 2), (1, 1, 1))  # downsampling per level
    iterations: tuple[int, ...] = (200, 150, 100)
    lr_mm: tuple[float, ...] = (1.0, 0.5, 0.25)  # Adam step, mm
    subsample: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 1, 1), (1, 2, 2))  # voxel stride per level
    bending_weight: float = 1.0
    jacobian_weight: float = 1.0e2
    jacobian_min: float = 0.2
    clip_hu: tuple[float, float] = (-1000.0, 1000.0)
    smooth_vox: tuple[float, float, float] = (0.0, 0.0, 0.0)  # Gaussian sigma (full-res voxels) on both images
    sliding: bool = True
    seed: int = 0

    def check(self) -> None:
        n = len(self.levels)
        if not (len(self.iterations) == len(self.lr_mm) == len(self.subsample) == n):
            raise ValueError(f"levels ({n}), iterations, lr_mm and subsample need one entry per level")


def _downsample(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Area-average ``(B, C, Z, Y, X)`` to ``shape`` (same field of view, voxel edges kept)."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return F.interpolate(x, size=tuple(shape), mode="area")


def gaussian_blur(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, Z, Y, X)`` with ``sigma`` voxels per axis (z, y, x); edges replicated."""
    for ax, sg in enumerate(sigma):
        if sg <= 0:
            continue
        r = max(1, int(np.ceil(3.0 * sg)))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / sg) ** 2)
        k = k / k.sum()
        dim = 2 + ax
        pad = [0, 0] * 3
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = r
        xp = F.pad(x, pad, mode="replicate")
        shape = [1, 1, 1, 1, 1]
        shape[dim] = k.numel()
        x = F.conv3d(xp.reshape(-1, 1, *xp.shape[2:]), k.view(shape)).reshape(*x.shape[:2], *x.shape[2:])
    return x


def _ncc(f: torch.Tensor, m: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weighted global NCC per pair: ``f``, ``m``, ``w`` ``(B, N...)`` -> ``(B,)``."""
    dims = tuple(range(1, f.ndim))
    sw = w.sum(dims, keepdim=True).clamp_min(eps)
    fc = f - (w * f).sum(dims, keepdim=True) / sw
    mc = m - (w * m).sum(dims, keepdim=True) / sw
    cov = (w * fc * mc).sum(dims)
    return cov / torch.sqrt((w * fc * fc).sum(dims) * (w * mc * mc).sum(dims) + eps)


@dataclass
class _Points:
    """The voxels one iteration looks at: level voxels ``offset::step`` inside the bounding box of the batch's
    body weights (a weight-0 voxel adds nothing to the weighted NCC, so the crop leaves the loss unchanged).
    A dense sub-grid ``(nz, ny, nx)``, shared by the pairs of the batch.  (Gathering only the weight > 0 voxels
    of the box was slower: on the phantom 78 % of the box is body, and index_select + its backward cost more
    than grid-sampling the other 22 %.)"""

    axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # level voxel indices of the sub-grid per axis (long)
    basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # basis rows of those indices ``(n_axis, K_axis)``
    base: torch.Tensor  # (nz, ny, nx, 3) grid_sample coordinate (x, y, z order, align_corners=True)
    fixed: torch.Tensor  # (B, nz, ny, nx)
    weight: torch.Tensor  # (B, nz, ny, nx)
    lung: torch.Tensor | None  # (B, 2, 1, nz, ny, nx) weights of the inside and outside fields (sliding) or None

    @property
    def size(self) -> int:
        return int(np.prod([a.numel() for a in self.axes]))


def _blend_weights(lung: torch.Tensor) -> torch.Tensor:
    """Lung weight ``(B, ...)`` -> weights of the inside and outside fields ``(B, 2, 1, ...)``."""
    return torch.stack([lung, 1.0 - lung], 1)[:, :, None]


class _Level:
    """Everything one pyramid level needs: images, weights, basis matrices, grid mapping, point subsets."""

    def __init__(self, fixed, moving, weight, factor, grid: ControlGrid, spacing, device, dtype, lung=None):
        full = grid.image_shape
        self.shape = tuple(max(1, int(round(n / f))) for n, f in zip(full, factor))
        self.fixed = _downsample(fixed, self.shape)[:, 0]  # (B, z, y, x)
        self.moving = _downsample(moving, self.shape)  # (B, 1, z, y, x)
        self.weight = _downsample(weight, self.shape)[:, 0]
        self.lung = None if lung is None else _downsample(lung.to(dtype)[:, None], self.shape)[:, 0]
        pos = [level_positions(n, m) for n, m in zip(full, self.shape)]
        self.pos = [torch.as_tensor(p, dtype=dtype, device=device) for p in pos]
        self.basis = [torch.as_tensor(b, dtype=dtype, device=device) for b in
                      (Basis(grid, pos).matrix(a) for a in range(3))]
        # normalised coordinate (align_corners=True) of level index q = (p + 0.5) * m / n - 0.5, p full-res
        a = [2.0 * (m / n) / max(m - 1, 1) for n, m in zip(full, self.shape)]
        b = [2.0 * (0.5 * m / n - 0.5) / max(m - 1, 1) - 1.0 for n, m in zip(full, self.shape)]
        self.a = torch.as_tensor(a, dtype=dtype, device=device)
        self.b = torch.as_tensor(b, dtype=dtype, device=device)
        # mm along (z, y, x) -> grid_sample units along (x, y, z): applied to the control points (the field is
        # linear in them), so the hot loop evaluates grid offsets directly
        self.mm_to_grid = (self.a / torch.as_tensor(spacing, dtype=dtype, device=device)).flip(0)
        active = self.weight.amax(0) > 0  # (z, y, x) union over the batch
        if bool(active.any()):
            nz = active.nonzero()
            self.lo = [int(v) for v in nz.amin(0)]
            self.hi = [int(v) + 1 for v in nz.amax(0)]
        else:  # no weight anywhere: NCC is 0 whatever the field; keep the whole grid
            self.lo, self.hi = [0, 0, 0], list(self.shape)
        self._points: dict[tuple, _Points] = {}

    def points(self, offset: Sequence[int], step: Sequence[int]) -> _Points:
        """Point subset for voxels ``offset::step`` (cached)."""
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
            self._points[key] = _Points(tuple(axes), tuple(self.basis[ax][axes[ax]] for ax in range(3)), base,
                                        take(self.fixed), take(self.weight),
                                        None if self.lung is None else _blend_weights(take(self.lung)))
        return self._points[key]

    def _evaluate(self, coef: torch.Tensor, pts: _Points) -> torch.Tensor:
        nb = coef.shape[0]
        t = evaluate(coef.reshape(nb, -1, *coef.shape[-3:]), *pts.basis)  # (B, 3 or 6, nz, ny, nx)
        if coef.ndim == 5:
            return t
        if pts.lung is None:
            raise ValueError("sliding control points need the level built with a lung mask")
        # (B, 2, 3, ...) * (B, 2, 1, ...) summed over the fields: backward is one product (slicing the two
        # fields apart cost zero-filled copies, unbind a stack + copy: ~2x the blend's time)
        return (t.unflatten(1, (2, 3)) * pts.lung).sum(1)

    def displacement(self, coef: torch.Tensor, pts: _Points) -> torch.Tensor:
        """The field at the points ``(B, 3, nz, ny, nx)`` mm (components z, y, x).  ``coef`` ``(B, 3, K...)`` or
        sliding ``(B, 2, 3, K...)`` (inside, outside; blended with the level's lung weight)."""
        return self._evaluate(coef, pts)

    def sample(self, coef: torch.Tensor, pts: _Points) -> torch.Tensor:
        """Warped moving image at the points ``(B, nz, ny, nx)`` (``pts.fixed``, ``pts.weight`` are the matching
        fixed values and weights).  Same field as :meth:`displacement`, scaled to grid units on the control
        points."""
        view = (1,) * (coef.ndim - 4) + (3, 1, 1, 1)
        off = self._evaluate(coef.flip(-4) * self.mm_to_grid.view(view), pts)  # (B, 3, ...) x, y, z grid units
        grid = pts.base + off.permute(0, 2, 3, 4, 1)
        warped = F.grid_sample(self.moving, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return warped[:, 0]


def _regulariser(grid: ControlGrid, coef: torch.Tensor, spacing, s: FFDSettings) -> torch.Tensor:
    """Bending energy plus Jacobian penalty at the interior control points, per pair ``(B,)``."""
    reg = s.bending_weight * bending_energy_knots(coef, grid, spacing)
    if s.jacobian_weight > 0:
        det = jacobian_knots(coef, grid, spacing)
        reg = reg + s.jacobian_weight * (F.relu(s.jacobian_min - det) ** 2).mean(dim=(1, 2, 3))
    return reg


def register(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    body: torch.Tensor,
    spacing: Sequence[float],
    settings: FFDSettings | None = None,
    lung: torch.Tensor | None = None,
    callback=None,
) -> tuple[torch.Tensor, dict]:
    """Register B pairs: ``fixed``, ``moving`` ``(B, Z, Y, X)`` HU, ``body`` fixed body mask ``(B, Z, Y, X)``.

    Returns control points ``(B, 3, Kz, Ky, Kx)`` mm (or ``(B, 2, 3, Kz, Ky, Kx)`` inside/outside with
    ``settings.sliding``, blended by ``lung``, the fixed lung mask) and a log dict (seconds, final NCC per level).
    """
    s = settings or FFDSettings()
    s.check()
    device, dtype = fixed.device, torch.float32
    grid = ControlGrid(tuple(fixed.shape[1:]), s.stride)
    lo, hi = s.clip_hu
    fx = fixed.to(dtype).clamp(lo, hi)[:, None]
    mv = moving.to(dtype).clamp(lo, hi)[:, None]
    wt = body.to(dtype)[:, None]
    if any(v > 0 for v in s.smooth_vox):
        fx, mv = gaussian_blur(fx, s.smooth_vox), gaussian_blur(mv, s.smooth_vox)
    nb = fx.shape[0]
    sliding = bool(s.sliding)
    if sliding and lung is None:
        raise ValueError("sliding registration needs the fixed lung mask")
    ncoef = (nb, 2, 3, *grid.shape) if sliding else (nb, 3, *grid.shape)
    coef = torch.zeros(ncoef, dtype=dtype, device=device, requires_grad=True)
    gen = torch.Generator(device="cpu").manual_seed(int(s.seed))
    log: dict = {"levels": []}
    for li, factor in enumerate(s.levels):
        t0 = time.perf_counter()
        lev = _Level(fx, mv, wt, factor, grid, spacing, device, dtype, lung=lung if sliding else None)
        opt = torch.optim.Adam([coef], lr=float(s.lr_mm[li]))
        step = s.subsample[li]
        ncc_val = None
        trace = []
        n_points = 0
        for it in range(int(s.iterations[li])):
            off = [int(torch.randint(0, int(st), (1,), generator=gen)) if st > 1 else 0 for st in step]
            pts = lev.points(off, step)
            n_points = pts.size
            opt.zero_grad(set_to_none=True)
            warped = lev.sample(coef, pts)
            reg = _regulariser(grid, coef.reshape(-1, 3, *grid.shape), spacing, s).view(nb, -1).sum(1)
            ncc = _ncc(pts.fixed, warped, pts.weight)
            loss = ((1.0 - ncc) + reg).sum()
            loss.backward()
            opt.step()
            ncc_val = ncc.detach()
            if it % 10 == 0 or it == int(s.iterations[li]) - 1:
                trace.append([it, float(ncc_val.mean()), float(reg.detach().mean())])
        log["levels"].append({"shape": list(lev.shape), "seconds": time.perf_counter() - t0, "trace": trace,
                              "points": n_points, "ncc": [float(v) for v in ncc_val] if ncc_val is not None else None})
        if callback is not None:
            callback(li, coef.detach())
    return coef.detach(), log


def blend_fields(inner: torch.Tensor, outer: torch.Tensor, lung: torch.Tensor) -> torch.Tensor:
    """Sliding field: ``lung * inner + (1 - lung) * outer`` with fields ``(B, 3, ...)`` and ``lung`` ``(B, ...)``."""
    w = lung.to(inner.dtype)[:, None]
    return w * inner + (1.0 - w) * outer
