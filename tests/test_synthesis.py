"""Synthesis exports: ITK displacement fields resample exactly like our warp; the command end to end."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from respmotion.cli import main
from respmotion.core import DisplacementField, Geometry, Volume
from respmotion.core import ops
from respmotion.io.volumes import save_field, save_volume


@pytest.mark.parametrize("suffix", ["mha", "nii.gz"])
def test_itk_displacement_field_resamples_like_our_warp(tmp_path, suffix):
    shape = (12, 20, 24)
    # oblique-free but non-identity direction: array x runs along LPS -y, array y along LPS +x
    direction = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], dtype=float)
    geom = Geometry(shape, (2.5, 1.25, 1.5), (12.0, -30.0, 7.5), tuple(direction.ravel()))
    rng = np.random.default_rng(1)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    img = (100 * np.sin(zz / 2.0) + 80 * np.cos(yy / 3.0) + 60 * np.sin(xx / 2.5)).astype(np.float32)
    # smooth field with different values per component: +2 mm z, -3 mm y, +4 mm x plus a bump
    bump = np.exp(-((yy - 10) ** 2 + (xx - 12) ** 2) / 30.0)
    u = np.stack([2.0 + 1.5 * bump, -3.0 + 0 * bump, 4.0 - 2.0 * bump]).astype(np.float32)
    field = DisplacementField(u, geom)
    vol = Volume(img, geom)
    ours = ops.warp_volume(vol, field).array

    save_volume(vol, tmp_path / "ct.mha")
    save_field(field, tmp_path / f"dvf.{suffix}")
    ct = sitk.ReadImage(str(tmp_path / "ct.mha"))
    disp = sitk.ReadImage(str(tmp_path / f"dvf.{suffix}"))
    tx = sitk.DisplacementFieldTransform(sitk.Cast(disp, sitk.sitkVectorFloat64))
    theirs = sitk.GetArrayFromImage(sitk.Resample(ct, ct, tx, sitk.sitkLinear, 0.0))
    inner = (slice(2, -2), slice(4, -4), slice(4, -4))  # p + u(p) stays inside the volume
    np.testing.assert_allclose(theirs[inner], ours[inner], atol=1e-2)
    # and it is a real motion, not the identity
    assert np.abs(ours[inner] - img[inner]).mean() > 10


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph")
    assert main(["phantom", "--out", str(out), "--patients", "1", "--shape", "16,64,64"]) == 0
    return out / "phantom_000" / "study_0"


def test_synthesize_with_ground_truth_motion(tmp_path, phantom_study):
    out = tmp_path / "syn"
    rc = main(["synthesize", str(phantom_study), "--model", "gt", "--out", str(out), "--no-render"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    s0 = summary["samples"][0]
    assert set(s0["phases"]) == {f"{k:02d}" for k in range(0, 100, 10)}
    assert all(v["folding_percent"] == 0 for v in s0["phases"].values())
    assert (out / "config.yaml").exists()
    # the 4D NIfTI has x, y, z, phase
    img4 = sitk.ReadImage(str(out / "sample_00" / "ct_4d.nii.gz"))
    assert img4.GetSize() == (64, 64, 16, 10)
    # phase 50 written equals the real phase 50 up to interpolation and noise
    p50 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "sample_00" / "phase_50.mha")))
    real = np.load(phantom_study / "phase_50.npy")
    p00 = np.load(phantom_study / "phase_00.npy")
    assert np.abs(p50 - real).mean() < 0.7 * np.abs(p00 - real).mean()


def test_synthesize_bad_input_is_one_line(tmp_path, capsys):
    rc = main(["synthesize", str(tmp_path / "missing.nii.gz"), "--model", "gt", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing.nii.gz" in err[0]
