"""Body and lung masks of a CT in HU (scipy.ndimage; no OpenCV).

* :func:`body_mask`: HU above a threshold, largest 3D connected component, holes filled slice by slice
  (axial), so the lungs and airways enclosed by the chest wall are inside the body.
* :func:`lung_mask`: air-like voxels inside the body (HU below a threshold), components large enough to be lung,
  holes (vessels) filled slice by slice.  Used by registration, synthesis and evaluation on data without lung masks.

Two thresholds, two meanings: :data:`BODY_THRESHOLD_HU` (-500) splits tissue (above) from air (below), the body
mask's and registration's air-filled knots (``FFDSettings.texture_air_hu``); :data:`LUNG_THRESHOLD_HU` (-400) takes
the lung voxels inside the body (below), higher so the partial-volume edge of the lung is inside the lung mask.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: tissue above, air below (HU): the body mask; registration's air-filled knots
BODY_THRESHOLD_HU = -500.0
#: lung voxels inside the body are below this (HU)
LUNG_THRESHOLD_HU = -400.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def body_mask(hu: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Body mask ``(z, y, x)`` uint8 of a CT ``(z, y, x)`` in HU; empty input (all air) gives an empty mask."""
    if hu.ndim != 3:
        raise ValueError(f"body_mask expects a (z, y, x) volume, got shape {hu.shape}")
    m = _largest_component(hu > threshold_hu)
    return _fill_slices(m).astype(np.uint8)


def lung_mask(hu: np.ndarray, body: np.ndarray | None = None, threshold_hu: float = LUNG_THRESHOLD_HU,
              min_fraction: float = 0.1) -> np.ndarray:
    """Lung mask ``(z, y, x)`` uint8: air inside the body, components >= ``min_fraction`` of the largest."""
    if body is None:
        body = body_mask(hu)
    air = (hu < threshold_hu) & (ndimage.binary_erosion(body.astype(bool), iterations=2))
    lab, n = ndimage.label(air)
    if n == 0:
        return np.zeros(hu.shape, np.uint8)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= min_fraction * sizes.max())
    return _fill_slices(np.isin(lab, keep)).astype(np.uint8)
