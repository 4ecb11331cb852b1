"""A user's own CT for synthesis: DICOM folder (or one file of the series), NIfTI or MHA/NRRD.

The result is the same :class:`Volume` type the prepared data uses (HU float32, ``(z, y, x)``,
LPS geometry), optionally resampled to the model shape with the field of view kept
(:func:`respmotion.core.ops.resample_volume`), so points in patient mm still land on the same
anatomy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.ops import resample_volume
from ..core.types import Volume
from ..io.dicom import is_dicom_file, read_dicom_series, series_uid_of
from ..io.volumes import load_volume
from ..runtime import check_allocation


def import_ct(
    path: str | os.PathLike,
    shape: Sequence[int] | None = None,
    series_uid: str | None = None,
    phase: float | None = None,
) -> Volume:
    """Read a CT (HU) from ``path`` and resample it to ``shape`` (z, y, x) if given.

    A DICOM folder may hold several series: pick one with ``series_uid`` or ``phase`` (percent).
    A single ``.dcm`` file stands for its whole series in the same folder.  ``meta`` records the
    source and the original geometry.
    """
    path = Path(path)
    if shape is not None:
        shape = check_target_shape(shape)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        vol = read_dicom_series(path, series_uid=series_uid, phase=phase)
    elif is_dicom_file(path):
        uid = series_uid_of(path)
        if series_uid is not None and series_uid != uid:
            raise ValueError(f"{path}: belongs to series {uid}, not {series_uid}")
        vol = read_dicom_series(path.parent, series_uid=uid)
    else:
        if series_uid is not None or phase is not None:
            raise ValueError(f"{path}: series/phase selection applies only to DICOM input")
        vol = load_volume(path)
    if not np.issubdtype(vol.array.dtype, np.number) or vol.array.dtype == np.bool_:
        raise ValueError(f"{path}: expected a numeric CT volume, got dtype {vol.array.dtype}")
    check_ct_values(vol.array, path)
    vol = Volume(vol.array.astype(np.float32, copy=False), vol.geometry,
                 {**vol.meta, "source": str(path), "original_geometry": vol.geometry.to_dict()})
    if shape is not None and shape != vol.geometry.shape:
        vol = resample_volume(vol, shape, order=1)
    return vol


#: Hounsfield units a CT voxel can hold: air -1024 (padding down to -3024) up to dense metal on extended scales
HU_LIMITS = (-4000.0, 70000.0)
#: fewest voxels along each axis of a CT volume (a slice or two is not a volume to breathe)
MIN_VOXELS = 3


def check_ct_values(array: np.ndarray, where: str | os.PathLike) -> None:
    """Refuse, in one line naming ``where``, a ``(z, y, x)`` array that is not a CT in HU: fewer than
    :data:`MIN_VOXELS` voxels along an axis, values outside :data:`HU_LIMITS`, or only two distinct
    values (a mask or label image)."""
    if min(array.shape) < MIN_VOXELS:
        raise ValueError(f"{where}: a {'x'.join(map(str, array.shape))} volume is not a 3D CT (need at least "
                         f"{MIN_VOXELS} voxels along each axis)")
    lo, hi = float(array.min()), float(array.max())
    if lo < HU_LIMITS[0] or hi > HU_LIMITS[1]:
        raise ValueError(f"{where}: values from {lo:g} to {hi:g} are not Hounsfield units (a CT lies within "
                         f"{HU_LIMITS[0]:g}..{HU_LIMITS[1]:g} HU)")
    if ((array == lo) | (array == hi)).all():
        raise ValueError(f"{where}: holds only the values {lo:g} and {hi:g}: a mask or label image, not a CT in HU")


#: peak memory of resampling to a target shape, bytes per target voxel: the float32 result and the
#: copy the writer or the next step makes of it
RESAMPLE_BYTES_PER_VOXEL = 8


def check_target_shape(shape: Sequence[int], workers: int = 1) -> tuple[int, int, int]:
    """``shape`` as 3 positive ints ``(z, y, x)``; a ``ValueError`` names ``--shape`` otherwise, and a
    ``MemoryError`` (:func:`respmotion.runtime.check_allocation`) refuses a shape ``workers`` volumes
    of which the memory cannot hold."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--shape {','.join(map(str, shape))}: shape must be 3 positive numbers (z, y, x)")
    check_allocation("volume (--shape)", shape, RESAMPLE_BYTES_PER_VOXEL * workers,
                     f"{workers} volume(s) at once" if workers > 1 else "")
    return shape  # type: ignore[return-value]
