"""Batched cubic B-spline free-form deformation (FFD) registration in plain torch.

``register(fixed, moving, body, spacing, settings)`` registers B pairs at once (one tensor; each pair has its
own control points and its own loss term, so the pairs do not interact): it finds control points ``c`` such
that ``moving(p + u(p)) ~= fixed(p)`` for ``p`` in the fixed body mask, ``u`` in mm on the fixed grid (pull).

Method (one control lattice, refined image pyramid, as hf-deepali's FFD set-up of SPEC section 7):

* similarity: global normalised cross-correlation weighted by the fixed body mask (area-downsampled to soft
  weights on coarse levels);
* regulariser: bending energy of ``u`` (mm^-2) at the control points plus a penalty on the Jacobian
  determinant below ``jacobian_min`` at the control points;
* Adam on the control points (mm), three levels from coarse to full resolution, the bending weight 10x and 3x
  stiffer on the two coarse levels (``bending_scale``);
* from the middle level on, the similarity is evaluated on a strided subset of the voxels (``subsample``
  (1, 2, 2)) whose offset changes every iteration: every voxel contributes over a few iterations and the
  images keep their full resolution (unlike halving the images, SPEC section 7: 0.53 mm), at a quarter of the
  grid-sampling cost; only the bounding box of the batch's body weights is visited (weight-0 voxels add nothing
  to the weighted NCC: same loss);
* folding repair (:func:`repair_folding`, on by default): the knot penalty cannot see every voxel, and the
  sliding blend is discontinuous at the lung surface, so after the last level the dense field's Jacobian
  determinant is computed exactly as :func:`respmotion.core.warp.jacobian_determinant` does; pairs with any
  det <= 0 get a few gradient steps on a hinge at the offending voxels (outside field first) until none is
  left.

Sliding (``sliding=True``, default): two fields, one used inside a mask of the fixed image and one outside, each
with its own regulariser, so the lungs may slide along the chest wall.  The mask (:func:`sliding_region`) is the
thoracic cavity around the lung mask (``sliding_region="cavity"``, :func:`sliding_mask`: lungs, mediastinum and
the abdomen under the diaphragm move with the inside field; chest wall and spine with the outside field) or the
lung mask alone (``"lung"``).  The inside field's weight is 1 in the region and falls to 0 over
``sliding_ramp_mm`` outside it (:func:`~respmotion.registration.bspline.blend_weight`): the threshold lung mask
stops short of the pleura, and the tissue in between still moves with the lung.

On a CPU the pairs of a batch are split over ``workers`` single-threaded workers (one per core).

Measurements behind the method, the settings and the hot loop (profile, speed, accuracy) are in
``docs/registration.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core import warp as W
from ..core.geometry import level_positions, level_to_normalized
from ..core.grid import to_voxels
from ..data.intensity import HU_WINDOW
from .bspline import Basis, ControlGrid, evaluate, evaluate_points, knot_regulariser, point_weights


@dataclass
class FFDSettings:
    """Optimiser settings (defaults: the measured best; see docs/registration.md)."""

    # stride and levels are in voxels of a `reference_shape` grid over the image's field of view (see for_shape)
    stride: tuple[float, float, float] = (3.0, 12.0, 12.0)  # control point spacing, full-res voxels (z, y, x)
    levels: tuple[tuple[float, float, float], ...] = ((4, 4, 4), (2, 2, 2), (1, 1, 1))  # downsampling per level
    reference_shape: tuple[int, int, int] | None = (50, 256, 256)  # None: voxels of the image itself
    iterations: tuple[int, ...] = (150, 100, 100)
    lr_mm: tuple[float, ...] = (1.0, 0.5, 0.25)  # Adam step, mm
    subsample: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 2, 2), (1, 2, 2))  # voxel stride per level
    bending_weight: float = 50.0
    bending_weight_outside: float | None = None  # sliding: the outside field's bending weight (None: bending_weight)
    # both bending weights times this per level, aligned at the finest level (last entry: finest; levels coarser
    # than the tuple reaches take its first entry; empty: 1): stiff coarse levels keep texture-poor regions
    # (abdomen below the diaphragm, chest wall) from taking a wrong large-scale motion (docs/registration.md)
    bending_scale: tuple[float, ...] = (10.0, 3.0, 1.0)
    # per level (aligned at the finest level like bending_scale; empty: 0): the bending weight per knot times
    # 1 + strength * relu(1 - g / median g over the body's knots), g the fixed image's gradient magnitude blurred
    # over a control cell (0: one weight everywhere; see texture_poverty)
    bending_texture: tuple[float, ...] = (0.0, 0.0, 30.0)
    texture_fields: str = "both"  # sliding: both | outside (the inside field keeps one weight everywhere)
    texture_lung_hu: float | None = -500.0  # knots whose blurred HU is below this keep one weight (None: none do)
    jacobian_weight: float = 1.0e2
    jacobian_min: float = 0.2
    clip_hu: tuple[float, float] = HU_WINDOW
    smooth_vox: tuple[float, float, float] = (0.0, 0.0, 0.0)  # Gaussian sigma (full-res voxels) on both images
    body_margin_mm: float = 0.0  # similarity weight: the fixed body mask dilated by this many mm (box, per axis)
    sliding: bool = True
    sliding_region: str = "cavity"  # cavity | lung: the inside field's region (see sliding_region)
    sliding_ramp_mm: float = 6.0  # the inside field's weight falls to 0 over this distance outside the region
    repair_folding: bool = True  # after the last level: remove every det <= 0 voxel (see repair_folding)
    # early stop of a level: every `stop_window` iterations, stop when no pair's mean loss over the window fell by
    # more than `stop_tol` x its (1 - NCC) since the previous window (0: run every iteration)
    stop_tol: float = 0.0
    stop_window: int = 10
    # CPU: pairs of a batch split over this many single-threaded workers (0: torch.get_num_threads()): one
    # worker per core, no OpenMP barriers between cores (docs/registration.md)
    workers: int = 0
    seed: int = 0

    def for_shape(self, shape: Sequence[int]) -> "FFDSettings":
        """These settings for an image of ``shape`` (z, y, x) voxels.

        ``stride`` and ``levels`` count voxels of a ``reference_shape`` grid (the defaults were chosen at
        50x256x256).  Along an axis where the image has more voxels, both are multiplied by
        ``shape / reference_shape``: the pyramid's finest level then has about the reference's voxels and the
        control points the same spacing relative to the field of view; the field is still evaluated at every voxel
        of the image.  (Unscaled, the defaults fail at a native 141x512x512 CT: docs/registration.md.)  Axes with
        fewer voxels, ``reference_shape`` None, and a result of this method are left as they are.

        Use::

            s = FFDSettings().for_shape((141, 512, 512))  # stride (8.46, 24, 24), levels (11.28, 8, 8) ... (2.82, 2, 2)
            grid = ControlGrid(shape, s.stride)
        """
        if self.reference_shape is None:
            return self
        r = [max(1.0, n / m) for n, m in zip(shape, self.reference_shape)]
        return replace(self, stride=tuple(float(a * v) for a, v in zip(self.stride, r)),
                       levels=tuple(tuple(float(f * v) for f, v in zip(lv, r)) for lv in self.levels),
                       reference_shape=None)

    def check(self) -> None:
        n = len(self.levels)
        if not (len(self.iterations) == len(self.lr_mm) == len(self.subsample) == n):
            raise ValueError(f"levels ({n}), iterations, lr_mm and subsample need one entry per level")
        if self.reference_shape is not None and (len(self.reference_shape) != 3 or min(self.reference_shape) < 1):
            raise ValueError(f"reference_shape must be 3 voxel counts >= 1 (z, y, x) or None, "
                             f"got {self.reference_shape}")
        if self.texture_fields not in ("both", "outside"):
            raise ValueError(f"texture_fields must be both or outside, got {self.texture_fields!r}")
        if any(v < 0 for v in self.bending_texture):
            raise ValueError(f"bending_texture must be >= 0 per level, got {self.bending_texture}")
        if self.sliding_region not in ("cavity", "lung"):
            raise ValueError(f"sliding_region must be cavity or lung, got {self.sliding_region!r}")


def _fill_hull(mask2d: np.ndarray) -> np.ndarray:
    """Filled convex hull of a 2-D boolean mask (the mask itself when its points span no area)."""
    from scipy.spatial import ConvexHull, QhullError

    pts = np.argwhere(mask2d)
    if len(pts) < 3:
        return mask2d.copy()
    try:
        eq = ConvexHull(pts).equations  # (facets, 3): normal . p + offset <= 0 inside
    except QhullError:  # collinear points: no area to fill
        return mask2d.copy()
    lo, hi = pts.min(0), pts.max(0) + 1
    grid = np.stack(np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij"), -1).reshape(-1, 2)
    inside = (grid @ eq[:, :2].T + eq[:, 2] <= 1e-9).all(1)
    out = mask2d.copy()
    out[lo[0]:hi[0], lo[1]:hi[1]] |= inside.reshape(hi[0] - lo[0], hi[1] - lo[1])
    return out


def sliding_mask(lung: np.ndarray, superior: float = 1.0, hu: np.ndarray | None = None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), bone_hu: float = 150.0,
                 bone_margin_mm: float = 5.0) -> np.ndarray:
    """Region that slides against the chest wall, from a lung mask ``(z, y, x)``: per axial slice the filled
    convex hull of the lung cross-sections at and above that slice (the thoracic cavity: lungs and mediastinum,
    and below the lungs the upper abdomen that follows the diaphragm, inside the rib cage's footprint).  With
    the CT ``hu``, bone inside that hull (the vertebral bodies, which do not move) and ``bone_margin_mm`` around it
    (in-plane, ``spacing`` mm (z, y, x)) are left out.  ``superior`` is +1 when array z increases towards superior
    (:meth:`respmotion.core.Geometry.superior_sign`).  Returns uint8 ``(z, y, x)``: the region of the inside field
    (its weight for :func:`register` and :func:`~respmotion.registration.bspline.dense_tensor` is
    :func:`~respmotion.registration.bspline.blend_weight` of it)."""
    lung = np.asarray(lung) > 0
    out = np.zeros(lung.shape, bool)
    acc = np.zeros(lung.shape[1:], bool)
    order = range(lung.shape[0] - 1, -1, -1) if superior > 0 else range(lung.shape[0])
    for k in order:
        acc |= lung[k]
        if acc.any():
            out[k] = _fill_hull(acc)
    if hu is not None:
        from scipy import ndimage

        from ..core.grid import ball

        bone = out & (np.asarray(hu) > bone_hu)
        disk = ball(spacing[1:], bone_margin_mm, min_half_width=1)[None]  # in-plane
        out &= ~ndimage.binary_dilation(bone, structure=disk)
        out |= lung  # the lungs themselves always slide
    return out.astype(np.uint8)


def sliding_region(hu: np.ndarray, body: np.ndarray, geometry, settings: "FFDSettings",
                   lung_threshold_hu: float = -400.0) -> np.ndarray:
    """The fixed image's mask for the sliding blend, uint8 ``(z, y, x)``: the HU-threshold lung mask
    (``settings.sliding_region == "lung"``) or the thoracic cavity around it (``"cavity"``, :func:`sliding_mask`).
    ``hu``, ``body`` ``(z, y, x)``; ``geometry`` a :class:`respmotion.core.Geometry` (spacing, superior axis).
    The blend's weight is ``blend_weight(region, geometry.spacing, settings.sliding_ramp_mm)``."""
    from ..anatomy import lung_mask

    lung = lung_mask(hu, body, lung_threshold_hu)
    if settings.sliding_region == "lung":
        return lung
    return sliding_mask(lung, geometry.superior_sign(), hu, geometry.spacing)


def _downsample(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Area-average ``(B, C, Z, Y, X)`` to ``shape`` (same field of view, voxel edges kept)."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return F.interpolate(x, size=tuple(shape), mode="area")


def dilate_box(mask: torch.Tensor, half: Sequence[int]) -> torch.Tensor:
    """Binary dilation of ``(B, C, Z, Y, X)`` by a box of ``half`` voxels either side per axis (z, y, x):
    separable max-pooling, same shape."""
    for ax, h in enumerate(half):
        if h <= 0:
            continue
        k = [1, 1, 1]
        k[ax] = 2 * int(h) + 1
        p = [0, 0, 0]
        p[ax] = int(h)
        mask = F.max_pool3d(mask, kernel_size=tuple(k), stride=1, padding=tuple(p))
    return mask


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


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair dot product of ``(B, N...)`` tensors -> ``(B,)`` (one BLAS call forward and backward)."""
    n = a.shape[0]
    return torch.bmm(a.reshape(n, 1, -1), b.reshape(n, -1, 1)).view(n)


class _FixedStats:
    """Fixed-image side of the weighted NCC, computed once per point set: ``fw = w (f - mean_w f)``, ``sum w``,
    ``sum w (f - mean_w f)^2`` per pair."""

    def __init__(self, f: torch.Tensor, w: torch.Tensor, eps: float = 1e-6):
        dims = tuple(range(1, f.ndim))
        self.w = w
        self.sw = w.sum(dims).clamp_min(eps)
        fc = f - ((w * f).sum(dims) / self.sw).view(-1, *(1,) * (f.ndim - 1))
        self.fw = (w * fc).contiguous()
        self.var = (self.fw * fc).sum(dims)

    def ncc(self, m: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Same value as :func:`respmotion.registration.quality.masked_ncc` (``sum w (f - mean f)(m - mean m) = sum fw m``): 1 product and 3 dot
        products on the points instead of ~15 elementwise passes."""
        wm = self.w * m
        s1 = wm.flatten(1).sum(1)
        var_m = _dot(wm, m) - s1 * s1 / self.sw
        return _dot(self.fw, m) / torch.sqrt(self.var * var_m + eps)


@dataclass
class _Points:
    """The voxels one iteration looks at: level voxels ``offset::step`` inside the bounding box of the batch's
    body weights (a weight-0 voxel adds nothing to the weighted NCC, so the crop leaves the loss unchanged).
    A dense sub-grid ``(nz, ny, nx)``, shared by the pairs of the batch (gathering only the weight > 0 voxels of
    the box was slower: docs/registration.md)."""

    axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # level voxel indices of the sub-grid per axis (long)
    basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # basis rows of those indices ``(n_axis, K_axis)``
    base: torch.Tensor  # (nz, ny, nx, 3) grid_sample coordinate (x, y, z order, align_corners=True)
    fixed: torch.Tensor  # (B, nz, ny, nx)
    weight: torch.Tensor  # (B, nz, ny, nx)
    lung: torch.Tensor | None  # (B, 1, nz, ny, nx) weight of the inside field (sliding) or None
    stats: "_FixedStats | None" = None  # fixed-image side of the NCC on these points

    @property
    def size(self) -> int:
        return int(np.prod([a.numel() for a in self.axes]))


class _Blend(torch.autograd.Function):
    """Sliding blend ``lung * inside + (1 - lung) * outside`` of ``t`` ``(B, 6, ...)`` (inside = channels 0-2)
    with ``lung`` ``(B, 1, ...)``; backward writes the two gradients into one preallocated tensor (cheaper than
    autograd through slices or a product with stacked weights: docs/registration.md)."""

    @staticmethod
    def forward(ctx, t, lung):
        ctx.save_for_backward(lung)
        inner, outer = t[:, :3], t[:, 3:]
        return torch.addcmul(outer, lung, inner - outer)

    @staticmethod
    def backward(ctx, g):
        (lung,) = ctx.saved_tensors
        g = g.contiguous()  # arrives channels-last from grid_sample; the basis products need (B, 6, ...) rows
        out = torch.empty((g.shape[0], 6, *g.shape[2:]), dtype=g.dtype, device=g.device)
        torch.mul(g, lung, out=out[:, :3])
        torch.sub(g, out[:, :3], out=out[:, 3:])
        return out, None


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
            f, w = take(self.fixed), take(self.weight)
            self._points[key] = _Points(tuple(axes), tuple(self.basis[ax][axes[ax]] for ax in range(3)), base, f, w,
                                        None if self.lung is None else take(self.lung)[:, None], _FixedStats(f, w))
        return self._points[key]

    def _evaluate(self, coef: torch.Tensor, pts: _Points) -> torch.Tensor:
        nb = coef.shape[0]
        t = evaluate(coef.reshape(nb, -1, *coef.shape[-3:]), *pts.basis)  # (B, 3 or 6, nz, ny, nx)
        if coef.ndim == 5:
            return t
        if pts.lung is None:
            raise ValueError("sliding control points need the level built with a lung mask")
        return _Blend.apply(t, pts.lung)

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


def _per_level(values: tuple[float, ...], n_levels: int, li: int, empty: float) -> float:
    """Level ``li``'s entry of a per-level tuple aligned at the finest level (its last entry; levels coarser than
    the tuple reaches take its first entry; empty: ``empty``)."""
    if not values:
        return empty
    return float(values[max(0, len(values) - (n_levels - li))])


def bending_factor(s: FFDSettings, li: int) -> float:
    """Level ``li``'s factor on the bending weights (``s.bending_scale`` aligned at the finest level)."""
    return _per_level(s.bending_scale, len(s.levels), li, 1.0)


def _level_settings(s: FFDSettings, li: int) -> FFDSettings:
    """``s`` with level ``li``'s bending weights (:func:`bending_factor`)."""
    k = bending_factor(s, li)
    if k == 1.0:
        return s
    out = None if s.bending_weight_outside is None else s.bending_weight_outside * k
    return replace(s, bending_weight=s.bending_weight * k, bending_weight_outside=out)


def texture_poverty(fixed: torch.Tensor, body: torch.Tensor, grid: ControlGrid, spacing,
                    lung_hu: float | None = None) -> torch.Tensor:
    """Lack of texture per interior knot ``(B, 1, Kz-2, Ky-2, Kx-2)`` in [0, 1]: ``relu(1 - g / g_body)``;
    a level's bending factor per knot is ``1 + strength * this``.

    ``g`` is the gradient magnitude (intensity per mm) of ``fixed`` ``(B, 1, Z, Y, X)`` blurred with a Gaussian
    of half a control spacing and read at the knot's voxel; ``g_body`` its median over the knots inside ``body``
    ``(B, 1, Z, Y, X)``.  Knots in texture-poor tissue (abdomen, chest wall, air) get up to ``1 + strength``
    times the bending weight (``FFDSettings.bending_texture``): the image cannot place them, so their neighbours
    should.  With ``lung_hu``, knots where ``fixed`` (HU) blurred the same way is below it get 0 (lung
    parenchyma keeps the one weight)."""
    sigma = [0.5 * v for v in grid.stride]
    idx = [torch.as_tensor(np.rint(grid.positions(ax)[1:-1]).astype(np.int64), device=fixed.device).clamp(
        0, fixed.shape[2 + ax] - 1) for ax in range(3)]
    at = lambda x: x[:, :, idx[0]][:, :, :, idx[1]][:, :, :, :, idx[2]]  # noqa: E731
    out = []
    for b in range(fixed.shape[0]):  # one pair and one axis at a time: a native CT's transients stay ~4 images
        f = fixed[b:b + 1]
        g2 = None
        for ax in range(3):
            d = torch.gradient(f, spacing=float(spacing[ax]), dim=2 + ax)[0].square_()
            g2 = d if g2 is None else g2.add_(d)
            del d
        gk = at(gaussian_blur(g2.sqrt_(), sigma))
        del g2
        inside = at(body[b:b + 1]) > 0
        ref = (gk[inside].median() if bool(inside.any()) else gk.median()).clamp_min(1e-6)
        poor = F.relu(1.0 - gk / ref)
        if lung_hu is not None:
            poor = poor * (at(gaussian_blur(f, sigma)) >= float(lung_hu))
        out.append(poor)
    return torch.cat(out)


def _regulariser(grid: ControlGrid, coef: torch.Tensor, spacing, s: FFDSettings,
                 knot_w: torch.Tensor | None = None) -> torch.Tensor:
    """Bending energy plus Jacobian penalty at the interior control points, per pair ``(B,)``; ``coef``
    ``(B, 3, K...)`` or sliding ``(B, 2, 3, K...)`` (the outside field with ``bending_weight_outside``);
    ``knot_w`` ``(B, 1, K-2...)`` multiplies the bending weights per knot (:func:`texture_poverty`)."""
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


class _FoldingProbe:
    """Jacobian determinant at full-resolution voxels ``vox`` ``(M, 3)`` (long, z, y, x) computed as
    :func:`respmotion.core.warp.jacobian_determinant` computes it on the dense field (central differences,
    one-sided at the image border), differentiable in the control points: ``(3, K...)`` or sliding
    ``(2, 3, K...)`` with the binary ``lung`` ``(Z, Y, X)`` choosing the field per voxel."""

    def __init__(self, grid: ControlGrid, lung: torch.Tensor | None, spacing, vox: torch.Tensor):
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
        self.lung = None if lung is None else lung[q[:, 0], q[:, 1], q[:, 2]].to(torch.float32)
        self.scale = W.mm_to_voxel_gradient(spacing, torch.stack(h).to(torch.float32))  # (comp, dir, M)

    def __call__(self, coef: torch.Tensor) -> torch.Tensor:
        u = evaluate_points(coef.reshape(-1, *coef.shape[-3:]), self.flat, self.weights)  # (3 or 6, 6M)
        if coef.ndim == 4 + 1:
            u = self.lung * u[:3] + (1.0 - self.lung) * u[3:]
        u = u.view(3, 3, 2, self.m)  # (component, direction, +/-, M)
        g = (u[:, :, 0] - u[:, :, 1]) * self.scale  # d u_c / d p_d in voxels
        return W.det3([[g[c, d] + (1.0 if c == d else 0.0) for d in range(3)] for c in range(3)])


def _determinant_box(coef: torch.Tensor, grid: ControlGrid, lung: torch.Tensor | None, spacing,
                     lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """Jacobian determinant (:func:`respmotion.core.warp.jacobian_determinant` in float32) of the dense field of ``coef`` (one pair) on the
    voxel box ``[lo, hi)``, equal to the full-grid values there: the field is evaluated with a one-voxel margin (dropped)
    so central differences see the same neighbours; at the image border both are one-sided."""
    n = grid.image_shape
    elo = [max(a - 1, 0) for a in lo]
    ehi = [min(b + 1, m) for b, m in zip(hi, n)]
    basis = Basis(grid, [np.arange(a, b, dtype=np.float64) for a, b in zip(elo, ehi)], coef.device, coef.dtype)
    if coef.ndim == 4:
        u = basis.field(coef[None])
    else:
        w = lung[elo[0]:ehi[0], elo[1]:ehi[1], elo[2]:ehi[2]].to(coef.dtype)[None, None]
        u = w * basis.field(coef[0][None]) + (1.0 - w) * basis.field(coef[1][None])
    det = W.jacobian_determinant(u.to(torch.float32), spacing, dtype=torch.float32)[0]
    return det[tuple(slice(a - e, b - e) for a, b, e in zip(lo, hi, elo))]


FOLD_TOL = 1e-3  # float32 determinants at or below this count as folded: core's float64 det of the rest is > 0


def repair_folding(coef: torch.Tensor, grid: ControlGrid, spacing, lung: torch.Tensor | None = None,
                   detect: float = 0.1, target: float = 0.25, rounds: int = 20, steps: int = 60,
                   step_mm: float = 0.1) -> tuple[torch.Tensor, list[dict]]:
    """Remove folding from finished registrations: ``coef`` ``(B, 3, K...)`` or ``(B, 2, 3, K...)`` mm.

    Per pair: the dense field's Jacobian determinant (the evaluator's, :func:`core.warp.jacobian_determinant`) is
    computed; if any voxel has det <= 0, the voxels with det < ``detect`` join a set whose determinants are
    pushed above ``target`` (gradient steps on the squared hinge, at most ``step_mm`` per control point and step,
    ``steps`` per round, evaluated at those voxels with :class:`_FoldingProbe`); repeated until the dense check finds no det <= 0.
    Sliding: the rounds move the outside field only (the lung field, hence the lung error, untouched) until one
    of them fails to reduce the folded voxels, or half the rounds are spent; then both fields.  Pairs
    without folding are returned unchanged.  Returns the control points and one record per pair.
    """
    out = coef.detach().clone()
    records = []
    for b in range(coef.shape[0]):
        lb = None if lung is None else lung[b].to(coef.dtype)
        rec = {"folded_before": 0, "rounds": 0, "voxels": 0, "folded_after": 0, "max_change_mm": 0.0}
        start = out[b].clone()
        active = None
        det = None
        outside_first = coef.ndim == 6  # sliding: move the outside field first (lung error untouched) ...
        prev_fold = None
        for r in range(rounds + 1):
            with torch.no_grad():
                if det is None:
                    det = _determinant_box(out[b], grid, lb, spacing, (0, 0, 0), grid.image_shape)
                else:  # only the voxels under moved control points can change
                    moved = ((out[b] - before).abs().reshape(-1, *grid.shape).amax(0) > 0).nonzero()
                    if moved.numel():
                        st = torch.as_tensor(grid.stride, dtype=torch.float64)
                        # support of control point k: voxels in ((k - 3) s, (k + 1) s); +-1 voxel for the differences
                        lo = [max(int(v), 0) for v in torch.floor((moved.amin(0) - 3) * st)]
                        hi = [min(int(v) + 1, m) for v, m in zip(torch.ceil((moved.amax(0) + 1) * st), grid.image_shape)]
                        det[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = _determinant_box(out[b], grid, lb, spacing, lo, hi)
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
            probe = _FoldingProbe(grid, lb, spacing, active)
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

    Returns control points ``(B, 3, Kz, Ky, Kx)`` mm on ``ControlGrid((Z, Y, X), s.stride)`` with
    ``s = settings.for_shape((Z, Y, X))`` (or ``(B, 2, 3, Kz, Ky, Kx)`` inside/outside with ``settings.sliding``,
    blended by ``lung``, the inside field's weight in [0, 1]: ``blend_weight`` of the fixed image's
    :func:`sliding_region` with ``settings.sliding_ramp_mm``) and a log dict (seconds, final NCC per level).  On
    a CPU the pairs are split over ``settings.workers`` single-threaded workers (the pairs do not interact);
    ``callback(level, coef)`` (or ``callback(level, coef, pair_indices)`` with workers) runs after each level.
    """
    s = settings or FFDSettings()
    s.check()
    s = s.for_shape(fixed.shape[1:])
    nb = fixed.shape[0]
    workers = min(nb, s.workers or torch.get_num_threads())
    if fixed.device.type != "cpu" or workers <= 1:
        return _register(fixed, moving, body, spacing, s, lung, callback)
    from concurrent.futures import ThreadPoolExecutor

    chunks = [c.tolist() for c in np.array_split(np.arange(nb), workers)]

    def one(idx: list[int]):
        torch.set_num_threads(1)  # this worker's own OpenMP setting
        sel = lambda t: None if t is None else t[idx[0]:idx[-1] + 1]  # noqa: E731
        return _register(sel(fixed), sel(moving), sel(body), spacing, s, sel(lung),
                         None if callback is None else lambda li, c: callback(li, c, idx))

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, chunks))
    finally:
        torch.set_num_threads(threads)
    coef = torch.cat([r[0] for r in results])
    log = {"workers": [r[1] for r in results], "seconds": time.perf_counter() - t0,
           "levels": [{"seconds": max(r[1]["levels"][li]["seconds"] for r in results),
                       "iterations": [r[1]["levels"][li]["iterations"] for r in results]}
                      for li in range(len(s.levels))]}
    if s.repair_folding:
        log["repair"] = {"seconds": max(r[1]["repair"]["seconds"] for r in results),
                         "pairs": [p for r in results for p in r[1]["repair"]["pairs"]]}
    return coef, log


def _register(fixed, moving, body, spacing, s: FFDSettings, lung, callback):
    """:func:`register` of one batch in the calling thread."""
    device, dtype = fixed.device, torch.float32
    grid = ControlGrid(tuple(fixed.shape[1:]), s.stride)
    lo, hi = s.clip_hu
    fx = fixed.to(dtype).clamp(lo, hi)[:, None]
    mv = moving.to(dtype).clamp(lo, hi)[:, None]
    wt = body.to(dtype)[:, None]
    if s.body_margin_mm > 0:  # both sides of the body surface in the similarity (its motion seen from the air too)
        wt = dilate_box(wt, [int(round(v)) for v in to_voxels(s.body_margin_mm, spacing)])
    if any(v > 0 for v in s.smooth_vox):
        fx, mv = gaussian_blur(fx, s.smooth_vox), gaussian_blur(mv, s.smooth_vox)
    nb = fx.shape[0]
    sliding = bool(s.sliding)
    if sliding and lung is None:
        raise ValueError("sliding registration needs the fixed lung mask")
    ncoef = (nb, 2, 3, *grid.shape) if sliding else (nb, 3, *grid.shape)
    coef = torch.zeros(ncoef, dtype=dtype, device=device, requires_grad=True)
    gen = torch.Generator(device="cpu").manual_seed(int(s.seed))
    poor = (texture_poverty(fx, body.to(dtype)[:, None], grid, spacing, s.texture_lung_hu)
            if any(s.bending_texture) else None)
    log: dict = {"levels": []}
    for li, factor in enumerate(s.levels):
        t0 = time.perf_counter()
        lev = _Level(fx, mv, wt, factor, grid, spacing, device, dtype, lung=lung if sliding else None)
        sl = _level_settings(s, li)
        strength = _per_level(s.bending_texture, len(s.levels), li, 0.0)
        knot_w = 1.0 + strength * poor if strength else None
        opt = torch.optim.Adam([coef], lr=float(s.lr_mm[li]))
        step = s.subsample[li]
        ncc_val = None
        trace = []
        n_points = 0
        window: list[torch.Tensor] = []
        prev = None
        done = int(s.iterations[li])
        for it in range(int(s.iterations[li])):
            off = [int(torch.randint(0, int(st), (1,), generator=gen)) if st > 1 else 0 for st in step]
            pts = lev.points(off, step)
            n_points = pts.size
            opt.zero_grad(set_to_none=True)
            warped = lev.sample(coef, pts)
            reg = _regulariser(grid, coef, spacing, sl, knot_w)
            ncc = pts.stats.ncc(warped)
            loss = ((1.0 - ncc) + reg).sum()
            loss.backward()
            opt.step()
            ncc_val = ncc.detach()
            if it % 10 == 0 or it == int(s.iterations[li]) - 1:
                trace.append([it, float(ncc_val.mean()), float(reg.detach().mean())])
            if s.stop_tol > 0:
                window.append((1.0 - ncc_val) + reg.detach())
                if len(window) == s.stop_window:
                    cur = torch.stack(window).mean(0)
                    window = []
                    if prev is not None and bool(((prev - cur) < s.stop_tol * (1.0 - ncc_val)).all()):
                        done = it + 1
                        break
                    prev = cur
        log["levels"].append({"shape": list(lev.shape), "seconds": time.perf_counter() - t0, "trace": trace,
                              "iterations": done, "points": n_points,
                              "ncc": [float(v) for v in ncc_val] if ncc_val is not None else None})
        if callback is not None:
            callback(li, coef.detach())
    if s.repair_folding:
        t0 = time.perf_counter()
        fixed_coef, rec = repair_folding(coef.detach(), grid, spacing, lung if sliding else None)
        log["repair"] = {"seconds": time.perf_counter() - t0, "pairs": rec}
        return fixed_coef, log
    return coef.detach(), log

