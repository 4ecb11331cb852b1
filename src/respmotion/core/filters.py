"""Separable filters on batched volumes ``(B, C, Z, Y, X)`` in torch: area downsampling, box dilation, Gaussian blur.

Sizes are in voxels of the volume they act on, per axis in array order ``(z, y, x)``; convert from mm with
:func:`respmotion.core.grid.to_voxels`.  Each function returns a new tensor and leaves its input as it is.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def downsample_area(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Area average of ``x`` ``(B, C, Z, Y, X)`` onto ``shape`` voxels (z, y, x) over the same field of view (voxel
    edges kept); ``x`` itself when it already has that shape."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return F.interpolate(x, size=tuple(shape), mode="area")


def dilate_box(mask: torch.Tensor, half: Sequence[int]) -> torch.Tensor:
    """Binary dilation of ``mask`` ``(B, C, Z, Y, X)`` by a box of ``half`` voxels either side per axis (z, y, x):
    separable max-pooling, same shape (an axis with ``half`` <= 0 is left as it is)."""
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
    """Separable Gaussian blur of ``x`` ``(B, C, Z, Y, X)`` with ``sigma`` voxels per axis (z, y, x; <= 0: that
    axis is not blurred); the kernel reaches 3 sigma, edges are replicated.  Same shape and dtype."""
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
