"""Motion and image metrics for evaluating registered or synthesized breathing motion.

Conventions: fields are :class:`DisplacementField` (``(3, z, y, x)`` mm, pull, fixed = the phase, moving = the
reference phase, normally 0 % end-inhale); volumes are HU; masks are :class:`Volume` (non-zero = inside) or
boolean ``(z, y, x)`` arrays on the same grid.  All distances are mm, volumes ml.

Image similarity (:func:`image_similarity`): SSIM and PSNR are computed with MONAI on both images clipped to
the HU window of :mod:`respmotion.data.intensity` ([-1000, 1000] HU), so the data range is 2000 HU (air to dense
bone-ish tissue; lung and soft tissue dominate).  MAE is in HU on the unclipped images.

Diaphragm excursion and lung-base shift are anatomy measures: :mod:`respmotion.anatomy.measures`.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np
import torch

from ..core import ops
from ..core import warp as W
from ..core.types import DisplacementField, Volume
from ..data.intensity import HU_WINDOW, check_hu_window
from .landmarks import error_stats

__all__ = ["dvf_error", "dvf_error_per_phase", "mean_displacement", "breathing_curve", "folding_percent",
           "sample_diversity", "lung_volume_ml", "warp_mask", "lung_volume_change", "image_similarity"]

MaskLike = Volume | np.ndarray | None


def _mask_array(mask: MaskLike, shape: tuple[int, ...], geometry=None) -> np.ndarray | None:
    """Boolean ``(z, y, x)`` mask checked against ``shape`` (and ``geometry`` for a Volume)."""
    if mask is None:
        return None
    if isinstance(mask, Volume):
        if geometry is not None and not mask.geometry.same_as(geometry):
            raise ValueError("mask and data must share one geometry")
        arr = mask.array
    else:
        arr = np.asarray(mask)
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"mask shape {arr.shape} != data shape {tuple(shape)}")
    m = arr != 0
    if not m.any():
        raise ValueError("mask is empty")
    return m


def _same_grid(a, b, what: str) -> None:
    if not a.geometry.same_as(b.geometry):
        raise ValueError(f"{what} must share one geometry")


# ---------------------------------------------------------------------------- motion fields
def dvf_error(pred: DisplacementField, ref: DisplacementField, mask: MaskLike = None) -> dict:
    """Per-voxel end-point error ``|pred - ref|`` in mm (inside ``mask`` if given): n, mean, sd, median, p95, max."""
    _same_grid(pred, ref, "predicted and reference fields")
    err = np.sqrt(((pred.array.astype(np.float64) - ref.array.astype(np.float64)) ** 2).sum(0))
    m = _mask_array(mask, err.shape, pred.geometry)
    return error_stats(err[m] if m is not None else err)


def dvf_error_per_phase(
    pred: Mapping[int, DisplacementField], ref: Mapping[int, DisplacementField], mask: MaskLike = None
) -> dict[str, dict]:
    """:func:`dvf_error` for every phase present in both mappings, keyed by ``str(phase)``."""
    return {str(int(p)): dvf_error(pred[p], ref[p], mask) for p in sorted(set(pred) & set(ref))}


def mean_displacement(field: DisplacementField | None, mask: MaskLike = None) -> float:
    """Mean displacement magnitude in mm (inside ``mask``, e.g. the reference lung mask); ``None`` -> 0."""
    if field is None:
        return 0.0
    mag = field.magnitude().astype(np.float64)
    m = _mask_array(mask, mag.shape, field.geometry)
    return float(mag[m].mean() if m is not None else mag.mean())


def breathing_curve(fields: Mapping[int, DisplacementField | None], mask: MaskLike = None) -> dict[str, float]:
    """Mean displacement magnitude (mm) per phase, keyed by ``str(phase)``: the breathing curve.

    The mask (lung of the reference phase) is applied on each field's grid, i.e. the target-phase grid; this
    is an approximation that is exact for phase 0 and close for lung-filling masks.
    """
    return {str(int(p)): mean_displacement(fields[p], mask) for p in sorted(fields)}


def folding_percent(field: DisplacementField, mask: MaskLike = None) -> float:
    """Percentage (0-100) of voxels with Jacobian determinant <= 0 (inside ``mask`` if given)."""
    m = _mask_array(mask, field.geometry.shape, field.geometry)
    mt = torch.as_tensor(m)[None] if m is not None else None
    return 100.0 * W.folding_fraction(W.to_tensor(field.array, dtype=torch.float64), field.geometry.spacing, mt)


def sample_diversity(samples: Sequence[DisplacementField], mask: MaskLike = None) -> dict:
    """Mean over all pairs of samples of the mean voxel-wise ``|u_i - u_j|`` (mm), inside ``mask`` if given.

    Returns ``{"mean_pairwise_mm", "n_samples", "n_pairs"}``; needs at least two samples of one grid.
    """
    if len(samples) < 2:
        raise ValueError(f"sample diversity needs at least 2 samples, got {len(samples)}")
    for s in samples[1:]:
        _same_grid(samples[0], s, "samples")
    m = _mask_array(mask, samples[0].geometry.shape, samples[0].geometry)
    vals = []
    for a, b in itertools.combinations(samples, 2):
        d = np.sqrt(((a.array.astype(np.float64) - b.array.astype(np.float64)) ** 2).sum(0))
        vals.append(float(d[m].mean() if m is not None else d.mean()))
    return {"mean_pairwise_mm": float(np.mean(vals)), "n_samples": len(samples), "n_pairs": len(vals)}


# ---------------------------------------------------------------------------- lung masks
def lung_volume_ml(mask: Volume) -> float:
    """Volume of the non-zero voxels of ``mask`` in millilitres."""
    return float(np.count_nonzero(mask.array)) * mask.geometry.voxel_volume_mm3() / 1000.0


def warp_mask(mask: Volume, field: DisplacementField) -> Volume:
    """Pull a binary mask through ``field`` (trilinear on 0/1, threshold 0.5) -> uint8 mask on the field's grid.

    Trilinear + threshold keeps partial-volume boundaries better than nearest-neighbour sampling.
    """
    soft = ops.warp_volume(Volume((mask.array != 0).astype(np.float32), mask.geometry), field)
    return Volume((soft.array >= 0.5).astype(np.uint8), field.geometry, dict(mask.meta))


def lung_volume_change(ref_mask: Volume, target_mask: Volume) -> dict:
    """Lung volumes (ml) of two phases and the change ``target - ref`` (ml and % of ref).

    For generated motion pass ``warp_mask(ref_mask, field)`` as ``target_mask``.
    """
    v0, v1 = lung_volume_ml(ref_mask), lung_volume_ml(target_mask)
    if v0 <= 0:
        raise ValueError("reference lung mask is empty")
    return {"ref_ml": v0, "target_ml": v1, "change_ml": v1 - v0, "change_percent": 100.0 * (v1 - v0) / v0}


# ---------------------------------------------------------------------------- images
def image_similarity(
    pred: Volume,
    real: Volume,
    mask: MaskLike = None,
    hu_window: tuple[float, float] = HU_WINDOW,
    ssim_window: int = 11,
) -> dict:
    """SSIM and PSNR (dB) on ``hu_window``-clipped HU (data range ``high - low``), MAE in HU (unclipped).

    Uses MONAI's :class:`SSIMMetric` (3D Gaussian window of ``ssim_window`` voxels, sigma 1.5) and
    :class:`PSNRMetric`.  With a ``mask``, ``mae_hu_mask`` is the MAE inside it as well.
    """
    from monai.metrics import PSNRMetric, SSIMMetric

    _same_grid(pred, real, "predicted and real volumes")
    lo, hi = check_hu_window(hu_window)
    if min(pred.geometry.shape) < ssim_window:
        raise ValueError(f"volume {pred.geometry.shape} is smaller than the SSIM window {ssim_window}")
    a = torch.as_tensor(np.clip(pred.array.astype(np.float32), lo, hi) - lo)[None, None]
    b = torch.as_tensor(np.clip(real.array.astype(np.float32), lo, hi) - lo)[None, None]
    ssim = SSIMMetric(spatial_dims=3, data_range=hi - lo, win_size=ssim_window)(a, b)
    psnr = PSNRMetric(max_val=hi - lo)(a, b)
    diff = np.abs(pred.array.astype(np.float64) - real.array.astype(np.float64))
    out = {
        "ssim": float(ssim.mean()),
        "psnr_db": float(psnr.mean()),
        "mae_hu": float(diff.mean()),
        "hu_window": [lo, hi],
        "data_range_hu": hi - lo,
    }
    m = _mask_array(mask, diff.shape, pred.geometry)
    if m is not None:
        out["mae_hu_mask"] = float(diff[m].mean())
    return out
