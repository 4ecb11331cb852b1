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
    vol = Volume(vol.array.astype(np.float32, copy=False), vol.geometry,
                 {**vol.meta, "source": str(path), "original_geometry": vol.geometry.to_dict()})
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be 3 positive numbers (z, y, x), got {shape}")
        if shape != vol.geometry.shape:
            vol = resample_volume(vol, shape, order=1)
    return vol
