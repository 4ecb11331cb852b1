"""Scalar lung anatomy of a CT: what the diffusion model reads beside the image latent.

A CT at end-inhale shows how much gas the lungs hold and how far they reach down: a patient whose lungs
reach low (a low diaphragm) or hold much gas tends to breathe deeper, and the amplitude is the largest
patient-to-patient difference in breathing motion (on the demo's phantom cohort, scaling the population-mean
field by each patient's true amplitude cuts its lung error from 1.9 to 0.7 mm; docs/diffusion.md).  An image
latent carries this too, but spread over many voxels; a handful of measured numbers lets a diffusion model
trained on tens of patients learn the relation instead of memorising its training patients.

The measures use the **gas fraction** of a voxel, ``clip(-HU / 1000, 0, 1)`` (water 0, air 1), inside the body
(:func:`~respmotion.anatomy.masks.body_mask`) shrunk in-plane by one voxel so the skin's partial-volume voxels
drop out.  Partial-volume voxels at the lung boundary count by how much gas they hold, so the measures move
smoothly with the anatomy even on a coarse grid, and no lung segmentation is needed (it fails on the coarsest
grids).  Gas in the bowel and stomach counts too; it is small beside the lungs':

* ``lung_gas_ml``: the gas volume inside the body, ml.
* ``lung_height_mean_mm``: per (y, x) column, the gas height ``sum_z fraction * dz`` (mm); mean over the
  columns that hold more than :data:`MIN_COLUMN_MM` of gas.
* ``lung_height_p90_mm``: the 90th percentile of the same column heights (the deepest columns reach the
  posterior costophrenic recesses, i.e. the diaphragm's lowest point).

Use: ``lung_features(hu, spacing)`` with ``hu`` a ``(z, y, x)`` HU array and ``spacing`` ``(z, y, x)`` mm;
returns a float64 array in the order of :data:`LUNG_FEATURES`.  The array z axis must be the superior-inferior
axis (every CT the project reads is stored so).  ``outside_training(features, mean, std, limit)`` names the
features a model trained on other patients has not seen (more than ``limit`` sd from their mean).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from .masks import body_mask

#: names (and order) of :func:`lung_features`' values
LUNG_FEATURES = ("lung_gas_ml", "lung_height_mean_mm", "lung_height_p90_mm")
#: a model reading these features clips their standardised values ``(f - mean) / std`` of its training patients to
#: +- this many sd: a CT far outside the training patients' range (another scanner, a real CT for a phantom-trained
#: model) is not extrapolated
FEATURE_LIMIT = 3.0
#: columns with less gas than this (mm) are the lungs' rim and are left out of the height statistics
MIN_COLUMN_MM = 10.0


def lung_features(hu: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """``(len(LUNG_FEATURES),)`` float64: gas volume (ml), mean and 90th-percentile column gas height (mm).

    Raises ``ValueError`` when the CT shows no lung (no column with :data:`MIN_COLUMN_MM` of gas)."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"lung features need a (z, y, x) CT, got shape {hu.shape}")
    dz, dy, dx = (float(s) for s in spacing)
    region = ndi.binary_erosion(body_mask(hu) > 0, structure=np.ones((1, 3, 3), bool))
    gas = np.clip(-hu / 1000.0, 0.0, 1.0) * region
    heights = gas.sum(axis=0) * dz  # (y, x) mm of gas per column
    cols = heights > MIN_COLUMN_MM
    if not cols.any():
        raise ValueError(f"no lung found (no column of the body holds {MIN_COLUMN_MM:g} mm of gas)")
    volume_ml = float(gas.sum()) * dz * dy * dx / 1000.0
    return np.array([volume_ml, float(heights[cols].mean()), float(np.percentile(heights[cols], 90))])


def outside_training(features: Sequence[float], mean: Sequence[float], std: Sequence[float],
                     limit: float) -> list[str]:
    """One phrase per feature lying more than ``limit`` sd from the training patients' ``mean`` (``std`` > 0),
    e.g. ``"lung_height_p90_mm 142.6 is 13.9 sd above the training mean 95.29 (sd 3.39)"``; empty when all lie
    within."""
    out = []
    for name, f, m, s in zip(LUNG_FEATURES, features, mean, std):
        z = (float(f) - float(m)) / float(s)
        if abs(z) > limit:
            out.append(f"{name} {float(f):.4g} is {abs(z):.1f} sd {'above' if z > 0 else 'below'} the training mean "
                       f"{float(m):.4g} (sd {float(s):.3g})")
    return out
