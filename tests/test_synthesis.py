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
    rc = main(["synthesize", str(phantom_study), "--model", "gt", "--out", str(out), "--no-render",
               "--formats", "nifti,mha,nifti4d"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["formats"] == ["nifti", "mha", "nifti4d"] and summary["seed"] == 0
    assert summary["motion"]["kind"] == "fixed fields"
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


def test_synthesize_without_a_model_uses_the_population_prior(tmp_path, phantom_study, capsys):
    """No --model: the DIR-Lab prior in the CT's own lungs; the motion's label and provenance in summary.json."""
    from respmotion.io.volumes import load_field

    out = tmp_path / "prior"
    assert main(["synthesize", str(phantom_study), "--out", str(out), "--no-render"]) == 0
    motion = json.loads((out / "summary.json").read_text())["motion"]
    assert motion["kind"] == "anatomical prior" and "DIR-Lab" in motion["calibrated_on"]
    u50 = load_field(out / "sample_00" / "dvf_50.nii.gz")
    assert np.abs(u50.array).max() > 3.0  # the lungs move by millimetres
    assert main(["synthesize", str(phantom_study), "--out", str(tmp_path / "p2"), "--steps", "5"]) == 2
    assert "default motion prior has none" in capsys.readouterr().err


def test_si_amplitude_scales_every_sample_to_the_given_superior_motion(tmp_path, phantom_study, capsys):
    """--si-amplitude-mm A: the lungs' mean superior motion at 50 % on the model grid is A mm in every sample."""
    from respmotion.core.ops import resample_array
    from respmotion.io.volumes import load_field
    from respmotion.synthesis.breathing import superior_mean
    from respmotion.synthesis.run import load_input

    out = tmp_path / "amp"
    assert main(["synthesize", str(phantom_study), "--out", str(out), "--no-render", "--samples", "2",
                 "--si-amplitude-mm", "3.0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["si_amplitude_mm"] == 3.0 and len(summary["amplitude_factors"]) == 2
    lung = load_input(phantom_study)[2]
    for i in range(2):
        u50 = load_field(out / f"sample_{i:02d}" / "dvf_50.nii.gz")
        model_lung = resample_array(lung.astype(np.float32), u50.geometry.shape) >= 0.5
        assert superior_mean(u50, model_lung) == pytest.approx(3.0, abs=0.1)
    assert main(["synthesize", str(phantom_study), "--out", str(tmp_path / "bad"), "--si-amplitude-mm", "-1"]) == 2
    assert "target amplitude must be >= 0 mm" in capsys.readouterr().err


def test_synthesize_bad_input_is_one_line(tmp_path, capsys):
    rc = main(["synthesize", str(tmp_path / "missing.nii.gz"), "--model", "gt", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing.nii.gz" in err[0]


def _nodule_mask(study_dir):
    from respmotion.io.layout import StudyDir

    sd = StudyDir(study_dir)
    info = sd.info()
    g = sd.load_phase(0).geometry
    c = np.asarray(info["nodules"][0]["center_lps_mm_phase00"])
    r = info["nodules"][0]["radius_mm"] + 4.0  # generous: the grid is coarse (9 x 5.6 x 5.6 mm)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), -1).reshape(-1, 3)
    d = np.linalg.norm(g.index_to_world(idx) - c, axis=1).reshape(g.shape)
    return Volume((d <= r).astype(np.uint8), g), info


def test_synthesize_structures_dicom_amplitude(tmp_path, phantom_study):
    mask, info = _nodule_mask(phantom_study)
    save_volume(mask, tmp_path / "gtv.nii.gz")
    out = tmp_path / "syn"
    rc = main(["synthesize", str(phantom_study), "--model", "gt", "--out", str(out), "--no-render", "--dicom",
               "--structures", str(tmp_path / "gtv.nii.gz")])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    gtv = s["samples"][0]["structures"]["gtv"]
    truth = info["nodule_trajectory_lps_mm"]
    for k, rec in gtv["phases"].items():
        # shift of the centroid relative to phase 00 vs the true nodule shift
        moved = np.subtract(rec["centroid_lps_mm"], gtv["phases"]["0"]["centroid_lps_mm"])
        true = np.subtract(truth[f"{int(k):02d}"][0], truth["00"][0])
        # within 1.5 mm of the nodule's true shift (up to 24 mm since the phantom's DIR-Lab calibration); the
        # generous mask on this 9 x 5.6 x 5.6 mm grid spans a motion gradient
        assert np.linalg.norm(moved - true) < 1.5, (k, moved, true)
    assert gtv["peak_to_peak_mm"]["z_si"] > 5 and gtv["itv_volume_cm3"] > 0
    rts = sorted((out / "sample_00" / "dicom").glob("rtstruct_phase_*.dcm"))
    assert len(rts) == 10  # one per phase, every structure and its ITV in it
    import pydicom

    rs = pydicom.dcmread(rts[5])
    assert [r.ROIName for r in rs.StructureSetROISequence] == ["gtv", "gtv_ITV"]
    # the written DICOM 4D-CT reads back as one 10-phase study through our importer
    from respmotion.io.dicom import read_dicom_series

    ph50 = read_dicom_series(out / "sample_00" / "dicom" / "phase_50")
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "sample_00" / "phase_50.nii.gz")))
    assert np.abs(ph50.array - ours).max() <= 1.0  # int16 storage rounding

    # amplitude 2: about twice the motion, still invertible
    out2 = tmp_path / "syn2"
    assert main(["synthesize", str(phantom_study), "--model", "gt", "--out", str(out2), "--no-render",
                 "--amplitude", "2"]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())["samples"][0]["phases"]["50"]
    s1 = s["samples"][0]["phases"]["50"]
    assert 1.8 < s2["mean_mm"] / s1["mean_mm"] < 2.2 and s2["folding_percent"] == 0.0


def test_evaluate_synthesis_report(tmp_path):
    data = tmp_path / "cohort"
    assert main(["phantom", "--out", str(data), "--patients", "2", "--shape", "16,64,64", "--seed", "3"]) == 0
    out = tmp_path / "ev"
    assert main(["evaluate", "synthesis", "--data", str(data), "--model", "gt", "--patients", "phantom_001",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    h = rep["headline"]
    assert h["model/dvf_error_lung_mean_mm"] < 1e-6  # the truth against itself
    assert h["zero/dvf_error_lung_mean_mm"] > 2.0 and h["population_mean/dvf_error_lung_mean_mm"] > 0.1
    assert abs(h["model/diaphragm_excursion_mm"] - h["truth/diaphragm_excursion_mm"]) < 1e-6
    # judged as a generator with the default 8 samples: 8 copies of the truth score 0 and do not spread
    assert h["model/samples"] == 8 and h["model/energy_score_mm"] < 1e-6 and h["model/spread_mm"] < 1e-6
    assert h["model_mean/dvf_error_lung_mean_mm"] < 1e-6 and set(rep["generator"]["energy_score"]) == {
        f"{k}" for k in range(10, 100, 10)}
    assert (out / "summary.png").stat().st_size > 10_000 and (out / "summary.html").exists()


def _smooth_case(native_shape, model_shape):
    """A CT with texture on ``native_shape`` and a smooth breathing-like field on its model grid."""
    geom = Geometry(native_shape, (2.5, 1.3, 1.1), (-20.0, 15.0, 40.0))
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in native_shape], indexing="ij")
    ct = Volume((-700 + 300 * np.sin(zz / 1.7) * np.cos(yy / 2.3) + 200 * np.sin(xx / 1.9)).astype(np.float32), geom)
    mg = geom.resized(model_shape)
    mz, my, mx = np.meshgrid(*[np.linspace(0, 1, n, dtype=np.float32) for n in model_shape], indexing="ij")
    base = np.stack([4.0 * np.sin(np.pi * my) * mx, 1.5 * mz * mx, -2.0 * np.cos(np.pi * mz) * my])
    fields = {k: DisplacementField((np.sin(np.pi * k / 100) * base).astype(np.float32), mg) for k in range(0, 100, 10)}
    return ct, fields


@pytest.mark.parametrize("native_shape,model_shape", [((21, 40, 36), (8, 16, 16)), ((6, 30, 22), (8, 16, 32))])
def test_streaming_equals_whole_volume_path(tmp_path, native_shape, model_shape):
    """Slab-wise warping of the native CT with the model-grid field (int16 HU written) equals the earlier
    whole-volume path (field resampled to the native grid, then warped) within 0.5 HU, and the written
    model-grid field, resampled to the native grid, equals that path's native field within 0.01 mm;
    ITK's DisplacementFieldTransform applies the written model-grid field like our warp."""
    from respmotion.io.volumes import load_field, load_volume
    from respmotion.synthesis.pipeline import FixedMotion, SynthesisOptions, synthesize

    ct, fields = _smooth_case(native_shape, model_shape)
    out = tmp_path / "s"
    synthesize(ct, FixedMotion(fields, model_shape), out, SynthesisOptions(formats=("nifti", "mha"), slab=4))
    for k in (0, 30, 50):
        native = ops.resample_field(fields[k], native_shape)  # the earlier path, one phase
        old = ops.warp_volume(ct, DisplacementField(native.array, ct.geometry)).array
        new = load_volume(out / "sample_00" / f"phase_{k:02d}.nii.gz")
        assert new.array.dtype == np.int16 and new.geometry.same_as(ct.geometry)
        assert np.abs(new.array - old).max() <= 0.5 + 1e-3
        written = load_field(out / "sample_00" / f"dvf_{k:02d}.mha")
        assert written.geometry.same_as(fields[k].geometry, tol=1e-3)
        assert np.abs(ops.resample_field(written, native_shape).array - native.array).max() <= 0.01
    moved = np.abs(ops.warp_volume(ct, DisplacementField(ops.resample_field(fields[50], native_shape).array,
                                                         ct.geometry)).array - ct.array).mean()
    assert moved > 5  # a real motion
    ct_img = sitk.ReadImage(str(out / "sample_00" / "phase_00.mha"))  # == the input CT in int16
    disp = sitk.ReadImage(str(out / "sample_00" / "dvf_50.mha"))
    tx = sitk.DisplacementFieldTransform(sitk.Cast(disp, sitk.sitkVectorFloat64))
    theirs = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(ct_img, sitk.sitkFloat32), ct_img, tx, sitk.sitkLinear))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "sample_00" / "phase_50.mha")))
    inner = (slice(2, -2), slice(3, -3), slice(3, -3))
    assert np.abs(theirs[inner] - ours[inner]).mean() < 1.0


def test_dicom_phases_join_the_input_study(tmp_path):
    """--formats dicom on a DICOM input: one series per phase in the input's study and frame of reference,
    'Gated, NN%', read back by SimpleITK and pydicom with the input's geometry; one RTSTRUCT per phase."""
    import pydicom
    from dicom_factory import write_ct_series

    from respmotion.io.dicom import list_dicom_files, read_dicom_series
    from respmotion.synthesis.pipeline import FixedMotion, SynthesisOptions, synthesize

    ct0, fields = _smooth_case((8, 24, 20), (4, 12, 10))
    folder = tmp_path / "input"
    write_ct_series(folder, ct0.array.astype(np.float64).round(), ct0.geometry.spacing, ct0.geometry.origin,
                    series_description="planning CT", study_uid="1.2.826.0.1.3680043.8.498.7",
                    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.8")
    ct = read_dicom_series(folder)
    gtv = np.zeros(ct.geometry.shape, np.uint8)
    gtv[2:6, 8:16, 6:14] = 1
    out = tmp_path / "s"
    synthesize(ct, FixedMotion(fields, (4, 12, 10)), out, SynthesisOptions(formats=("dicom",)),
               structures={"GTV": gtv}, template=str(folder))
    d = out / "sample_00" / "dicom"
    assert not list(out.glob("sample_00/*.nii.gz"))  # only the formats asked for
    for k in range(0, 100, 10):
        hs = [pydicom.dcmread(p, stop_before_pixels=True) for p in list_dicom_files(d / f"phase_{k:02d}")]
        assert {h.StudyInstanceUID for h in hs} == {"1.2.826.0.1.3680043.8.498.7"}
        assert {h.FrameOfReferenceUID for h in hs} == {"1.2.826.0.1.3680043.8.498.8"}
        assert {h.SeriesDescription for h in hs} == {f"Gated, {k:02d}%"} and len({h.SeriesInstanceUID for h in hs}) == 1
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(d / f"phase_{k:02d}")))
        img = reader.Execute()
        assert img.GetSize() == ct.geometry.shape[::-1]
        np.testing.assert_allclose(img.GetOrigin(), ct.geometry.origin, atol=1e-3)
        np.testing.assert_allclose(img.GetSpacing(), ct.geometry.spacing[::-1], atol=1e-4)
        rs = pydicom.dcmread(d / f"rtstruct_phase_{k:02d}.dcm")
        assert rs.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.7"
        assert [r.ROIName for r in rs.StructureSetROISequence] == ["GTV", "GTV_ITV"]
        ref_series = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert ref_series.SeriesInstanceUID == hs[0].SeriesInstanceUID
    assert read_dicom_series(d / "phase_00").geometry.same_as(ct.geometry)


def test_output_folder_is_owned_and_an_interrupted_dicom_run_recovers(tmp_path, phantom_study, capsys):
    out = tmp_path / "syn"
    base = ["synthesize", str(phantom_study), "--model", "gt", "--out", str(out), "--no-render", "--formats", "dicom"]
    assert main(base) == 0
    # what a killed run leaves: a half-written series in a hidden temporary folder, a phase folder missing
    stale = out / "sample_00" / "dicom" / ".tmp-dicom-40-x"
    stale.mkdir()
    (stale / "CT0001.dcm").write_bytes(b"half")
    import shutil

    shutil.rmtree(out / "sample_00" / "dicom" / "phase_90")
    assert main(base) == 0  # the same settings: redone
    assert not stale.exists() and len(list((out / "sample_00" / "dicom" / "phase_90").iterdir())) == 16
    capsys.readouterr()
    assert main([*base, "--seed", "4"]) == 2  # other settings: refused in one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "seed" in err[0]
    assert main([*base, "--seed", "4", "--overwrite"]) == 0


def _interior_mass(ph, k: int) -> float:
    """Mass (g, (HU + 1000) / 1000 g/ml) of the phantom's phase-00 lung interior (mask eroded by 2 voxels) followed
    to phase ``k`` with the exact field (trilinear occupancy): partial-volume edge voxels stay out of the sum."""
    from scipy import ndimage

    from respmotion.core import warp as W

    g = ph.geometry
    interior = ndimage.binary_erosion(ph.phase(0)["lung"].astype(bool), iterations=2).astype(np.float32)
    d = ph.phase(k)
    occ = W.warp(W.to_tensor(interior), W.to_tensor(d["dvf"]), g.spacing)[0, 0].numpy()
    return float((occ * (d["image"] + 1000.0)).sum()) / 1000.0 * float(np.prod(g.spacing)) / 1000.0


def test_phantom_lungs_keep_their_mass_with_the_exact_motion():
    """The phantom's lung density follows its exact Jacobian (analytic, equal to the numerical one of its field):
    the lung interior's mass stays within 1 % over the cycle, while its volume changes by > 5 %."""
    from respmotion.core import warp as W
    from respmotion.data.phantom import Phantom

    ph = Phantom(3, (16, 64, 64), noise_hu=0.0)
    g = ph.geometry
    num = W.jacobian_determinant(W.to_tensor(ph.field(50)), g.spacing)[0].numpy()
    inner = (slice(2, -2),) * 3
    assert np.abs(ph.jacobian(50) - num)[inner].mean() < 0.01
    m0 = _interior_mass(ph, 0)
    for k in (20, 50, 80):
        assert abs(_interior_mass(ph, k) / m0 - 1.0) < 0.01, k
    lung = [ph.phase(k)["lung"].sum() for k in (0, 50)]
    assert lung[1] < 0.95 * lung[0]  # a real volume change (> 5 %): the law has something to keep


def test_mass_intensities_keep_lung_mass_and_warp_is_the_old_output(tmp_path, phantom_study):
    """Synthesis from phase 00 with the exact fields and with the default prior keeps the lung mass within 1 %
    (summary.json's per-phase record, also plotted); ``--intensity warp`` writes the plain warp, bit for bit
    (``warp_native`` of the CT alone, the earlier pipeline), and loses mass with the volume."""
    import torch

    from respmotion.io.volumes import load_field, load_volume
    from respmotion.synthesis.native import warp_native
    from respmotion.synthesis.writer import hu_int16
    from respmotion.synthesis.run import load_input

    for model in (["--model", "gt"], []):
        out = tmp_path / f"mass{len(model)}"
        assert main(["synthesize", str(phantom_study), *model, "--out", str(out), "--no-render"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["intensity"] == "mass" and summary["input_phase"] == 0
        rec = summary["samples"][0]["phases"]
        assert max(abs(v["lung"]["lung_mass_change_percent"]) for v in rec.values()) < 1.0
        assert rec["50"]["lung"]["lung_volume_ml"] < rec["00"]["lung"]["lung_volume_ml"]
        assert rec["50"]["lung"]["mean_lung_hu"] > rec["00"]["lung"]["mean_lung_hu"] + 5  # denser at exhale
        assert (out / "summary.png").stat().st_size > 0
        assert "lung_mass_change_percent" in (out / "summary.html").read_text()
    out = tmp_path / "warp"
    assert main(["synthesize", str(phantom_study), "--model", "gt", "--out", str(out), "--no-render",
                 "--intensity", "warp"]) == 0
    ct = load_input(phantom_study)[0]
    chans = torch.from_numpy(ct.array.astype(np.float32))[None]
    for k in (0, 30, 50):
        f = load_field(out / "sample_00" / f"dvf_{k:02d}.nii.gz")
        plain = hu_int16(warp_native(chans, f, ct.geometry)[0])
        assert np.array_equal(load_volume(out / "sample_00" / f"phase_{k:02d}.nii.gz").array, plain)
    rec = json.loads((out / "summary.json").read_text())["samples"][0]["phases"]
    assert rec["50"]["lung"]["lung_mass_change_percent"] < -5


def test_field_inversion_composes_to_zero():
    """``invert(u)`` is the inverse pull: ``compose(u, inv(u))`` within 1e-3 mm everywhere, ``compose(inv(u), u)``
    within 0.1 mm away from the grid's border (where ``p + u(p)`` leaves the grid, the inverse is not known)."""
    from respmotion.core import warp as W

    sp = (2.5, 1.5, 1.5)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in (12, 24, 24)], indexing="ij")
    u = W.to_tensor(np.stack([6 * np.sin(np.pi * y) * np.sin(np.pi * x) * (1 - z),
                              2 * np.sin(np.pi * z) * np.sin(np.pi * x), -1.5 * np.sin(np.pi * y) * z]))
    v = W.invert(u, sp)
    assert float(W.compose(u, v, sp).norm(dim=1).max()) < 1e-3
    assert float(W.compose(v, u, sp).norm(dim=1)[0, 2:-2, 2:-2, 2:-2].max()) < 0.1
    assert float(v.abs().max()) > 4.0  # a real motion


def test_input_phase_50_reproduces_the_cycle(tmp_path, phantom_study):
    """From the phantom's phase 50 with its exact motion (``--model gt``), the re-anchored cycle matches the truth:
    phase 50 is the input itself, the inhale phases expand the lungs, each re-anchored field is the exact pull
    from phase 50 (the phantom's analytic inverse) within 0.3 mm on average in the lungs (the stored fields interpolated
    off their 5.6 mm grid near the sliding interface; 0.01 mm at 50x256x256), and each phase's HU error
    is within 15 % + 1 HU of warping the same input with that exact field (what the inversion adds)."""
    import torch

    from respmotion.data.phantom import make_patient
    from respmotion.io.volumes import load_field, load_volume
    from respmotion.synthesis.native import warp_native
    from respmotion.synthesis.writer import hu_int16
    from respmotion.synthesis.run import load_input

    out = tmp_path / "from50"
    assert main(["synthesize", str(phantom_study), "--model", "gt", "--out", str(out), "--no-render",
                 "--input-phase", "50"]) == 0
    summary = json.loads(out.joinpath("summary.json").read_text())
    assert summary["input_phase"] == 50 and summary["reanchoring"][0]["inversion"]["mean_mm"] < 1e-3
    rec = summary["samples"][0]["phases"]
    assert rec["00"]["lung"]["lung_volume_ml"] > 1.1 * rec["50"]["lung"]["lung_volume_ml"]
    ct, _, lung = load_input(phantom_study, 50)
    study = json.loads((phantom_study / "study.json").read_text())
    ph = make_patient(study["seed"], ct.geometry.shape, 0.0)
    z, y, x = ph.base_coords()
    chans = torch.from_numpy(np.stack([ct.array.astype(np.float32), lung.astype(np.float32)]))
    inside = lung.astype(bool)
    for k in range(0, 100, 10):
        truth = np.load(phantom_study / f"phase_{k:02d}.npy")
        got = load_volume(out / "sample_00" / f"phase_{k:02d}.nii.gz").array.astype(np.float32)
        u = ph.field(k).astype(np.float64)
        q = ph.move_points(50, np.stack([z + u[0], y + u[1], x + u[2]], -1))  # exact: phase_k(p) = phase_50(q)
        exact = DisplacementField(np.stack([q[..., 0] - z, q[..., 1] - y, q[..., 2] - x]).astype(np.float32),
                                  ct.geometry)
        field_err = np.linalg.norm(load_field(out / "sample_00" / f"dvf_{k:02d}.nii.gz").array - exact.array, axis=0)
        assert field_err[inside].mean() < 0.3, (k, float(field_err[inside].mean()))
        baseline = hu_int16(warp_native(chans, exact, ct.geometry, mass_weight=1)[0]).astype(np.float32)
        body = truth > -900
        err, base = (float(np.abs(a - truth)[body].mean()) for a in (got, baseline))
        assert err <= 1.15 * base + 1.0, (k, err, base)
        if k == 50:
            assert err < 1.0  # the input itself, up to int16 rounding


@pytest.mark.parametrize("flag,value", [("--input-phase", "45.5"), ("--input-phase", "100"),
                                        ("--input-phase", "-10"), ("--input-phase", "exhale"),
                                        ("--intensity", "density")])
def test_bad_input_phase_or_intensity_is_one_line_and_writes_nothing(tmp_path, phantom_study, capsys, flag, value):
    out = tmp_path / "o"
    assert main(["synthesize", str(phantom_study), "--model", "gt", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and value in err[0]
    assert not out.exists()


def test_api_run_checks_settings_first_and_reads_the_trace_once(tmp_path, phantom_study, monkeypatch):
    """``load_inputs`` (the API path, not only the CLI) refuses bad settings before it reads the CT, and a
    ``--trace`` run reads its CSV once (settings check, disk-space check and frames share it)."""
    from respmotion.synthesis import breathing
    from respmotion.synthesis.pipeline import SynthesisOptions
    from respmotion.synthesis.run import SynthesizeConfig, load_inputs, run_synthesis

    with pytest.raises(ValueError, match="--samples 0"):
        load_inputs(SynthesizeConfig(ct=str(tmp_path / "no-such-ct"), options=SynthesisOptions(samples=0)))
    with pytest.raises(FileNotFoundError, match="structure file not found"):
        load_inputs(SynthesizeConfig(ct=str(tmp_path / "no-such-ct"), structures=[str(tmp_path / "none.nii.gz")]))
    t = np.arange(0.0, 4.01, 0.5)
    trace = tmp_path / "trace.csv"
    trace.write_text("time,amplitude\n" + "".join(f"{a},{np.cos(np.pi * a / 2.0):.4f}\n" for a in t))
    reads = []
    real = breathing.read_trace
    monkeypatch.setattr(breathing, "read_trace", lambda path: reads.append(path) or real(path))
    summary = run_synthesis(SynthesizeConfig(ct=str(phantom_study), out=str(tmp_path / "o"), model="gt",
                                             trace=str(trace), render=False))
    assert len(reads) == 1 and len(summary["trace"]["frames"]) == len(t)


def test_identical_samples_are_reanchored_once(monkeypatch):
    """A cycle given for several samples (a model without randomness) is inverted once; its samples share it."""
    from respmotion.synthesis import anchor

    g = Geometry((6, 10, 12), (3.0, 2.0, 2.0))
    zz = np.linspace(0.0, 1.0, 6, dtype=np.float32)[:, None, None] * np.ones((6, 10, 12), np.float32)
    cycle = {k: DisplacementField(np.stack([k / 20.0 * zz, 0 * zz, 0 * zz]), g) for k in range(0, 100, 10)}
    other = {k: DisplacementField(f.array * 0.5, g) for k, f in cycle.items()}
    calls = []
    real = anchor.anchor_field
    monkeypatch.setattr(anchor, "anchor_field", lambda c, p: calls.append(p) or real(c, p))
    cycles, anchors, records = anchor.reanchor_cycles([cycle, cycle, other], 50)
    assert len(calls) == 2 and cycles[0] is cycles[1] and cycles[0] is not cycles[2]
    assert anchors[0] is anchors[1] and records[0] == records[1]
    assert not cycles[2][50].array.any() and cycles[0][0].array.any()
    single = anchor.reanchor({0: cycle[0]}, anchors[0], 50)[0]
    np.testing.assert_array_equal(single.array, anchor.reanchor_field(cycle[0], anchors[0]).array)
