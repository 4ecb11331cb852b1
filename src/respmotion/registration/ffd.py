"""Batched cubic B-spline free-form deformation (FFD) registration in plain torch: the optimiser.

``register(fixed, moving, body, spacing, settings)`` registers B pairs at once (one tensor; each pair has its
own control points and its own loss term, so the pairs do not interact): it finds control points ``c`` such
that ``moving(p + u(p)) ~= fixed(p)`` for ``p`` in the fixed body mask, ``u`` in mm on the fixed grid (pull),
and returns them as an :class:`~respmotion.registration.field.FFDField` (control points + their grid).

Method (one control lattice, refined image pyramid; settings: :class:`~respmotion.registration.config.FFDSettings`):

* similarity: global normalised cross-correlation weighted by the fixed body mask (area-downsampled to soft
  weights on coarse levels; :mod:`~respmotion.registration.similarity`);
* regulariser: bending energy of ``u`` (mm^-2) at the control points plus a penalty on the Jacobian
  determinant below ``jacobian_min`` at the control points, the bending weight stiffer on the coarse levels
  (``bending_scale``) and in texture-poor tissue (``bending_texture``; :mod:`~respmotion.registration.regulariser`,
  :mod:`~respmotion.registration.texture`);
* Adam on the control points (mm), levels from coarse to full resolution (:mod:`~respmotion.registration.level`);
  from the middle level on the similarity is evaluated on a strided subset of the voxels (``subsample``) whose
  offset changes every iteration, inside the bounding box of the batch's body weights;
* folding repair after the last level (``repair_folding``; :mod:`~respmotion.registration.folding`).

Sliding (``sliding=True``, default): two fields, one used inside a region of the fixed image and one outside, each
with its own regulariser, so the lungs may slide along the chest wall.  The caller passes the inside field's weight
per voxel, ``inside_weight`` in [0, 1]: :func:`~respmotion.registration.bspline.blend_weight` of
:func:`respmotion.anatomy.sliding_region` (``settings.sliding_region``) with ``settings.sliding_ramp_mm``.

On a CPU the pairs of a batch are split over ``workers`` single-threaded workers (one per core).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from ..core.filters import dilate_box, gaussian_blur
from ..core.grid import to_voxels
from .bspline import ControlGrid
from .config import FFDSettings
from .field import FFDField
from .folding import repair_folding
from .level import Level
from .regulariser import level_settings, per_level, regulariser
from .texture import texture_poverty


def register(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    body: torch.Tensor,
    spacing: Sequence[float],
    settings: FFDSettings | None = None,
    inside_weight: torch.Tensor | None = None,
    callback=None,
) -> tuple[FFDField, dict]:
    """Register B pairs: ``fixed``, ``moving`` ``(B, Z, Y, X)`` HU, ``body`` the fixed body mask ``(B, Z, Y, X)``,
    ``spacing`` mm (z, y, x).

    ``inside_weight`` ``(B, Z, Y, X)`` in [0, 1] (needed with ``settings.sliding``): the inside field's weight per
    voxel of the fixed image, ``blend_weight(sliding_region(...), spacing, settings.sliding_ramp_mm)``.

    Returns the :class:`~respmotion.registration.field.FFDField` (control points ``(B, 3, K...)``, or
    ``(B, 2, 3, K...)`` inside/outside with ``settings.sliding``, on the control grid of
    ``settings.for_shape((Z, Y, X))``) and a log dict (seconds, iterations and final NCC per level, folding repair
    records).  On a CPU the pairs are split over ``settings.workers`` single-threaded workers (the pairs do not
    interact); ``callback(level, coef)`` (or ``callback(level, coef, pair_indices)`` with workers) runs after each
    level.
    """
    s = settings or FFDSettings()
    s.check()
    s = s.for_shape(fixed.shape[1:])
    grid = ControlGrid(tuple(fixed.shape[1:]), s.stride)
    if s.sliding and inside_weight is None:
        raise ValueError("sliding registration needs the inside field's weight (inside_weight)")
    weight = inside_weight if s.sliding else None
    nb = fixed.shape[0]
    workers = min(nb, s.workers or torch.get_num_threads())
    if fixed.device.type != "cpu" or workers <= 1:
        coef, log = _register(fixed, moving, body, spacing, s, grid, weight, callback)
        return FFDField(coef, grid, weight), log
    from concurrent.futures import ThreadPoolExecutor

    chunks = [c.tolist() for c in np.array_split(np.arange(nb), workers)]

    def one(idx: list[int]):
        torch.set_num_threads(1)  # this worker's own OpenMP setting
        sel = lambda t: None if t is None else t[idx[0]:idx[-1] + 1]  # noqa: E731
        return _register(sel(fixed), sel(moving), sel(body), spacing, s, grid, sel(weight),
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
    return FFDField(coef, grid, weight), log


def _register(fixed, moving, body, spacing, s: FFDSettings, grid: ControlGrid, weight, callback):
    """:func:`register` of one batch in the calling thread (``s`` already :meth:`~FFDSettings.for_shape`'d,
    ``weight`` the inside field's or None): control points ``(B, [2,] 3, K...)`` mm and the log."""
    device, dtype = fixed.device, torch.float32
    lo, hi = s.hu_window
    fx = fixed.to(dtype).clamp(lo, hi)[:, None]
    mv = moving.to(dtype).clamp(lo, hi)[:, None]
    wt = body.to(dtype)[:, None]
    if s.body_margin_mm > 0:  # both sides of the body surface in the similarity (its motion seen from the air too)
        wt = dilate_box(wt, [int(round(v)) for v in to_voxels(s.body_margin_mm, spacing)])
    if any(v > 0 for v in s.smooth_vox):
        fx, mv = gaussian_blur(fx, s.smooth_vox), gaussian_blur(mv, s.smooth_vox)
    nb = fx.shape[0]
    ncoef = (nb, 2, 3, *grid.shape) if s.sliding else (nb, 3, *grid.shape)
    coef = torch.zeros(ncoef, dtype=dtype, device=device, requires_grad=True)
    gen = torch.Generator(device="cpu").manual_seed(int(s.seed))
    poor = (texture_poverty(fx, body.to(dtype)[:, None], grid, spacing, s.texture_air_hu)
            if any(s.bending_texture) else None)
    log: dict = {"levels": []}
    for li, factor in enumerate(s.levels):
        t0 = time.perf_counter()
        lev = Level(fx, mv, wt, factor, grid, spacing, device, dtype, inside_weight=weight)
        strength = per_level(s.bending_texture, len(s.levels), li, 0.0)
        knot_w = 1.0 + strength * poor if strength else None
        rec = _optimise_level(coef, lev, grid, spacing, s, li, knot_w, gen)
        log["levels"].append({"shape": list(lev.shape), "seconds": time.perf_counter() - t0, **rec})
        if callback is not None:
            callback(li, coef.detach())
    if s.repair_folding:
        t0 = time.perf_counter()
        fixed_coef, rec = repair_folding(coef.detach(), grid, spacing, weight)
        log["repair"] = {"seconds": time.perf_counter() - t0, "pairs": rec}
        return fixed_coef, log
    return coef.detach(), log


def _optimise_level(coef: torch.Tensor, lev: Level, grid: ControlGrid, spacing, s: FFDSettings, li: int,
                    knot_w: torch.Tensor | None, gen: torch.Generator) -> dict:
    """Adam on ``coef`` (in place) for pyramid level ``li`` (``s.iterations[li]`` steps of ``s.lr_mm[li]`` mm, the
    level's bending weights times ``knot_w``, voxel subsets ``s.subsample[li]`` drawn from ``gen``), stopping early
    as ``s.stop_tol`` says; returns the level's log (trace, iterations, points, final NCC per pair)."""
    sl = level_settings(s, li)
    opt = torch.optim.Adam([coef], lr=float(s.lr_mm[li]))
    step = s.subsample[li]
    n_iter = int(s.iterations[li])
    ncc_val = None
    trace = []
    n_points = 0
    window: list[torch.Tensor] = []
    prev = None
    done = n_iter
    for it in range(n_iter):
        off = [int(torch.randint(0, int(st), (1,), generator=gen)) if st > 1 else 0 for st in step]
        pts = lev.points(off, step)
        n_points = pts.size
        opt.zero_grad(set_to_none=True)
        warped = lev.sample(coef, pts)
        reg = regulariser(grid, coef, spacing, sl, knot_w)
        ncc = pts.stats.ncc(warped)
        loss = ((1.0 - ncc) + reg).sum()
        loss.backward()
        opt.step()
        ncc_val = ncc.detach()
        if it % 10 == 0 or it == n_iter - 1:
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
    return {"trace": trace, "iterations": done, "points": n_points,
            "ncc": [float(v) for v in ncc_val] if ncc_val is not None else None}
