"""The native CT pulled through a model-grid field, slab by slab (:func:`warp_native`).

Motion models make their fields on their own grid (e.g. 50x256x256) covering the CT's field of view; the CT is
warped on its own grid.  :class:`NativeField` evaluates such a field at the native voxels a slab of ``slab``
slices at a time (the numbers of :func:`respmotion.core.ops.resample_field` of the whole field), so memory
holds the native CT, one output phase and the small model-grid field, never a native-size field.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core import warp as W
from ..core.geometry import Geometry
from ..core.ops import resample_array
from ..core.types import DisplacementField

SLAB = 16  # native slices warped at once (memory, not results)


class NativeField:
    """A pull field on a grid covering ``native``'s field of view, evaluated on native slabs.

    The values are those of :func:`respmotion.core.ops.resample_field` (trilinear, voxel edges kept,
    Gaussian pre-filter along an axis the native grid is coarser in), computed separably: the
    field is brought to the native in-plane size once (``(3, Zm, Y, X)``), then each slab is a
    linear blend of two of those planes.  ``slab(z0, z1)`` -> ``(3, z1 - z0, Y, X)`` float32 mm.
    """

    def __init__(self, f: DisplacementField, native: Geometry) -> None:
        g = f.geometry
        self.identity = g.same_as(native)
        if self.identity:
            self.planes = np.asarray(f.array, dtype=np.float32)
            return
        if not native.resized(g.shape).same_as(g, tol=1e-3):
            raise ValueError(f"field grid {g.shape} / {g.spacing} mm does not cover the CT's field of view "
                             f"({native.shape} / {native.spacing} mm)")
        nz, mz = native.shape[0], g.shape[0]
        planes = resample_array(f.array, (mz,) + tuple(native.shape[1:]), 1)
        if mz > nz:  # the whole-field resampling smooths along z before shrinking it; so do we
            from scipy.ndimage import gaussian_filter1d

            planes = gaussian_filter1d(planes, (mz / nz - 1.0) / 2.0, axis=1, mode="nearest")
        self.planes = planes
        # continuous model-grid slice of every native slice centre (through the geometries), clamped like torch
        idx = np.zeros((nz, 3))
        idx[:, 0] = np.arange(nz)
        c = np.clip(g.world_to_index(native.index_to_world(idx))[:, 0], 0.0, mz - 1)
        self.lo = np.minimum(np.floor(c).astype(int), mz - 1)
        self.hi = np.minimum(self.lo + 1, mz - 1)
        self.w = (c - self.lo).astype(np.float32)

    def slab(self, z0: int, z1: int) -> np.ndarray:
        if self.identity:
            return self.planes[:, z0:z1]
        w = self.w[z0:z1, None, None]
        return self.planes[:, self.lo[z0:z1]] * (1.0 - w) + self.planes[:, self.hi[z0:z1]] * w


def warp_native(channels: torch.Tensor, f: DisplacementField, native: Geometry, slab: int = SLAB,
                mass_weight: int | None = None) -> np.ndarray:
    """Pull ``channels`` ``(C, Z, Y, X)`` (float32, on ``native``) through ``f`` slab by slab.

    ``f`` is on ``native`` or on a grid covering its field of view (:class:`NativeField`).  Same
    values as :func:`respmotion.core.ops.warp_volume` with the field resampled to ``native``
    (trilinear, border padding); returns ``(C, Z, Y, X)`` float32.  ``mass_weight``: index of a
    pulled channel (the lung occupancy) weighting :func:`respmotion.core.warp.mass_preserving_hu` on
    channel 0 (HU), with the Jacobian determinant of the very field sampled here (the native voxels'
    field, central differences across slab borders: the numbers of the whole volume's determinant).
    """
    nf = NativeField(f, native)
    nz, ny, nx = native.shape
    out = np.empty(tuple(channels.shape), dtype=np.float32)
    yy, xx = torch.meshgrid(torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32),
                            indexing="ij")
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        # with the density law, one slice beyond the slab for the Jacobian's central differences; the field of
        # those rows is built once (NativeField.slab is row by row: the slab's rows are the same numbers)
        h0, h1 = (max(0, z0 - 1), min(nz, z1 + 1)) if mass_weight is not None else (z0, z1)
        u = torch.from_numpy(np.ascontiguousarray(nf.slab(h0, h1)))[None]  # (1, 3, h1 - h0, Y, X) mm
        vox = W.mm_to_voxels(u[:, :, z0 - h0:z1 - h0].contiguous(), native.spacing)[0]
        vox[0] += torch.arange(z0, z1, dtype=torch.float32)[:, None, None]
        vox[1] += yy
        vox[2] += xx
        vals = W.sample_points(channels, vox.reshape(3, -1).T).T.reshape(-1, z1 - z0, ny, nx)  # (C, z, y, x)
        if mass_weight is not None:
            det = W.jacobian_determinant(u, native.spacing, dtype=torch.float32)[0, z0 - h0:z1 - h0]
            vals[0] = W.mass_preserving_hu(vals[0], det, vals[mass_weight])
        out[:, z0:z1] = vals.numpy()
    return out
