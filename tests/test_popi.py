"""The real POPI end-inhale series loads as it is and keeps its geometry through resampling.

Quirks it carries: empty SeriesDescription (phase in the Elscint private tag), SpacingBetweenSlices
-2.0, a malformed private element (01F1,1026), file order superior->inferior.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from respmotion.core.ops import resample_volume
from respmotion.data.importer import import_ct
from respmotion.io.landmarks import read_popi_csv

MODEL_SHAPE = (50, 256, 256)


@pytest.fixture(scope="module")
def popi(shared_data):
    root = shared_data / "popi-4dct-phase00"
    full = import_ct(root / "dicom")
    points = read_popi_csv(root / "landmarks" / "popi_landmarks_lps_mm.csv")[0]
    return root, full, resample_volume(full, MODEL_SHAPE), points


def test_popi_loads_in_hu_ordered_by_position(popi):
    root, full, _, _ = popi
    g = full.geometry
    assert g.shape == (141, 512, 512)
    np.testing.assert_allclose(g.spacing, (2.0, 0.9765625, 0.9765625))
    np.testing.assert_allclose(g.origin, (-250.0, -164.0, -164.5))
    np.testing.assert_allclose(g.direction, np.eye(3).ravel())
    assert full.array.min() == -1024 and full.array.max() == 2976
    assert abs(float(full.array.mean()) - (-667.7)) < 0.1
    # index 0 is the most inferior slice, the last file by name
    last = pydicom.dcmread(root / "dicom" / "00-slice140.dcm")
    np.testing.assert_array_equal(full.array[0], last.pixel_array.astype(np.float32) - 1024)
    assert full.meta["phase_percent"] == 0.0  # from the private tag; SeriesDescription is empty
    assert full.meta["series_description"] == ""


def test_popi_landmarks_map_to_the_right_voxels_after_resampling(popi):
    _, full, res, points = popi
    assert res.geometry.shape == MODEL_SHAPE
    # mm -> index -> mm round trip at the resampled geometry
    idx = res.geometry.world_to_index(points)
    back = res.geometry.index_to_world(idx)
    err_vox = np.abs(back - points) / np.asarray(res.geometry.spacing[::-1])
    assert err_vox.max() < 0.5
    assert np.all(idx > -0.5) and np.all(idx < np.asarray(MODEL_SHAPE) - 0.5)  # inside the volume
    # the same field of view: resampled index = (full index + 0.5) * n_res / n_full - 0.5
    scale = np.asarray(MODEL_SHAPE, float) / np.asarray(full.geometry.shape, float)
    expect = (full.geometry.world_to_index(points) + 0.5) * scale - 0.5
    np.testing.assert_allclose(idx, expect, atol=1e-6)
    # the landmarks (lung vessels/bifurcations) sit at lung/soft-tissue HU, not in the air outside
    hu = ndimage.map_coordinates(res.array, idx.T, order=1)
    assert hu.min() > -950 and -800 < np.median(hu) < -200
    # and the resampled volume shows what the (equally smoothed) full one shows at those points,
    # better than at points moved by one resampled voxel along any axis
    factors = np.asarray(full.geometry.shape, float) / np.asarray(MODEL_SHAPE, float)
    smooth = ndimage.gaussian_filter(full.array, sigma=(factors - 1.0) / 2.0)

    def diff(shift_xyz):
        q = full.geometry.world_to_index(points + shift_xyz)
        return np.abs(ndimage.map_coordinates(smooth, q.T, order=1) - hu).mean()

    here = diff(np.zeros(3))
    steps = np.asarray(res.geometry.spacing[::-1])
    for axis in range(3):
        for sign in (-1.0, 1.0):
            assert here < diff(sign * steps[axis] * np.eye(3)[axis])


def test_population_prior_on_popi_moves_the_lungs_not_the_spine(popi):
    """The shipped prior (DIR-Lab population model in POPI's own lungs; nothing fitted on POPI) at its 48x128x128
    grid: vertebral bodies (dense posterior-midline bone) move < 1 mm, the lung base much more than the apex,
    and the phase-00 landmarks land closer to their phase-50 positions than with no motion."""
    from respmotion.anatomy.lung_frame import motion_regions
    from respmotion.evaluation.landmarks import landmark_error
    from respmotion.io.landmarks import read_popi_csv
    from respmotion.models.anatomical_prior import PriorMotion

    root, full, _, _ = popi
    model = PriorMotion()
    ct = resample_volume(full, model.shape)
    cycle = model.generate(ct, 1, 0)[0]
    mag = np.linalg.norm(cycle[50].array, axis=0)
    reg = motion_regions(ct.array, ct.geometry)
    x = np.indices(mag.shape)[2]
    vertebrae = reg["bone"] & ~reg["lung"] & (np.abs(x - mag.shape[2] / 2) < 6) & (ct.array > 150)
    assert vertebrae.sum() > 1000 and mag[vertebrae].max() < 1.0
    lung = reg["lung"]
    levels = [float(mag[z][lung[z]].mean()) for z in range(mag.shape[0]) if lung[z].sum() > 200]
    assert levels[0] > 3 * levels[-1]  # array z grows superiorly: base first
    lms = read_popi_csv(root / "landmarks" / "popi_landmarks_lps_mm.csv")
    err = landmark_error(cycle[50], lms[0], lms[50]).summary()["all"]["mean"]
    none = landmark_error(None, lms[0], lms[50]).summary()["all"]["mean"]
    assert err < none
