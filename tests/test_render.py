"""Breathing-cycle rendering: display orientation, GIF file sets, frame counts and sizes, CLI."""

from __future__ import annotations

import json
import logging

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from respmotion.cli import main
from respmotion.core import DisplacementField, Geometry, Volume
from respmotion.io.atomic import write_npy
from respmotion.io.layout import PHASES, StudyDir
from respmotion.io.volumes import save_field
from respmotion.viz import RenderConfig, render_cycle, warp_masks
from respmotion.viz.frames import CONTOUR_COLORS, nice_floor
from respmotion.viz.movie import MP4_UNAVAILABLE, ffmpeg_available, write_mp4
from respmotion.viz.orient import Canonical, choose_slices, view_slice, view_vectors

SHAPE = (12, 20, 24)  # z, y, x
SPACING = (4.0, 2.0, 1.5)  # mm: the coronal/sagittal aspect differs from the axial one


def marker_volume(shape=SHAPE) -> np.ndarray:
    """-1000 HU with a bright block at the patient's right-anterior-superior corner
    (LPS-aligned array: low x = right, low y = anterior, high z = superior)."""
    a = np.full(shape, -1000.0, np.float32)
    a[-3:, :4, :4] = 400.0
    return a


def top_left(img: np.ndarray) -> bool:
    """The bright pixels are all in the upper-left quadrant of a 2D display image."""
    r, c = np.nonzero(img > 0)
    return r.size > 0 and r.max() < img.shape[0] / 2 and c.max() < img.shape[1] / 2


# ------------------------------------------------------------------ orientation
def test_views_put_right_anterior_superior_top_left():
    geom = Geometry(SHAPE, SPACING)
    canon = Canonical.from_geometry(geom)
    c = canon.volume(marker_volume())
    # axial: right on the image left, anterior on top; coronal: right left, superior top;
    # sagittal: anterior left, superior top -> the R-A-S corner is top left in all three
    for view in ("axial", "coronal", "sagittal"):
        idx = {"axial": SHAPE[0] - 1, "coronal": 0, "sagittal": 0}[view]
        assert top_left(view_slice(c, view, idx)), view
    assert view_slice(c, "coronal", 0).shape == (SHAPE[0], SHAPE[2])  # rows = z, cols = x
    assert canon.spacing == SPACING


def test_flipped_and_permuted_storage_displays_the_same():
    """The same body stored with x running right->left... and with axes permuted shows identically."""
    geom = Geometry(SHAPE, SPACING)
    vol = marker_volume()
    ref = Canonical.from_geometry(geom).volume(vol)
    # 1) array x reversed: index axis x points to the patient's right (-x in LPS)
    flipped = Geometry(SHAPE, SPACING, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    np.testing.assert_array_equal(Canonical.from_geometry(flipped).volume(vol[:, :, ::-1]), ref)
    # 2) array stored (x, y, z): index axes i, j, k point along world z, y, x
    perm = Geometry(SHAPE[::-1], SPACING[::-1], direction=(0, 0, 1, 0, 1, 0, 1, 0, 0))
    canon = Canonical.from_geometry(perm)
    np.testing.assert_array_equal(canon.volume(vol.transpose(2, 1, 0)), ref)
    assert canon.spacing == SPACING
    f = np.zeros((3, *SHAPE[::-1]), np.float32)
    f[0], f[2] = 1.0, 2.0  # along array axis 0 (= world x, left) and axis 2 (= world z, superior)
    fc = canon.field(f)
    assert fc.shape == (3, *SHAPE)
    assert np.allclose(fc[0], 2.0) and np.allclose(fc[1], 0.0) and np.allclose(fc[2], 1.0)


def test_field_components_follow_the_display():
    """A motion towards patient-left and superior points right and up on a coronal image."""
    geom = Geometry(SHAPE, SPACING, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))  # array x runs to the right
    f = np.zeros((3, *SHAPE), np.float32)
    f[0] = 2.0  # +z = superior
    f[2] = -3.0  # array x points to the patient's right, so -x = towards the patient's left
    canon = Canonical.from_geometry(geom)
    vec = view_vectors(canon.field(f), "coronal", 5)
    assert np.allclose(vec[0], 3.0) and np.allclose(vec[1], -2.0)  # right +3, down -2 (= up 2)


def test_choose_slices_like_the_research_code():
    assert choose_slices(50, 5, "middle") == [23, 24, 25, 26, 27]
    assert choose_slices(50, 1, "middle") == [25]
    assert choose_slices(50, 3, "first") == [0, 1, 2]
    assert choose_slices(50, 3, "last") == [47, 48, 49]
    assert choose_slices(4, 9, "middle") == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        choose_slices(10, 1, "centre")


def test_nice_floor():
    assert [nice_floor(x) for x in (0.87, 1.0, 3.9, 7.2, 14.0)] == [0.5, 1.0, 2.0, 5.0, 10.0]


# ------------------------------------------------------------------ synthetic cycle
def cycle(shape=SHAPE, spacing=SPACING):
    """A reference CT and 10 smooth pull fields (superior-inferior breathing, 0 at phase 00)."""
    geom = Geometry(shape, spacing)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    ct = np.where(((yy - shape[1] / 2) / (0.4 * shape[1])) ** 2 + ((xx - shape[2] / 2) / (0.4 * shape[2])) ** 2 < 1,
                  40.0, -1000.0).astype(np.float32)
    ct[zz > shape[0] / 2] = np.minimum(ct[zz > shape[0] / 2], -850.0)
    fields = []
    for p in PHASES:
        s = (1 - np.cos(2 * np.pi * p / 100)) / 2
        f = np.zeros((3, *shape), np.float32)
        f[0] = -6.0 * s * np.exp(-((zz - shape[0] / 2) / 4.0) ** 2)
        f[1] = -1.5 * s * yy / shape[1]
        fields.append(DisplacementField(f, geom))
    return Volume(ct, geom), fields


def gif_frames(path):
    with Image.open(path) as im:
        return im.n_frames, im.size  # size is (width, height)


def test_contour_drawn_top_left_on_coronal_frame(tmp_path):
    """Frame-level orientation: a mask at the patient's right-superior corner is outlined top left."""
    geom = Geometry(SHAPE, SPACING)
    vol = Volume(np.full(SHAPE, -1000.0, np.float32), geom)
    mask = np.zeros(SHAPE, bool)
    mask[-5:-1, :, 2:8] = True  # superior, right; all y
    out = render_cycle(tmp_path, [vol] * 10, contours=[[mask] * 10], views=("coronal",), difference=False,
                       panel_px=200)
    gif = tmp_path / "coronal_010_motion.gif"
    assert gif in out
    frame = iio.imread(gif, index=3)[..., :3].astype(int)
    red = np.array([int(CONTOUR_COLORS[0][i:i + 2], 16) for i in (1, 3, 5)])
    ys, xs = np.nonzero(np.abs(frame - red).sum(-1) < 90)
    assert ys.size > 20
    # the image area is centred at x = (0.04 + 0.74 / 2) * 200 px, y = (1 - 0.10 - 0.79 / 2) * 200 px
    assert xs.mean() < 0.41 * 200 - 15 and ys.mean() < 0.505 * 200 - 5


def test_render_cycle_synthesis_file_set_and_frames(tmp_path):
    ref, fields = cycle()
    mask = ref.array > -900
    out = render_cycle(tmp_path, reference=ref, fields=fields, contours=[warp_masks(mask, ref, fields)],
                       config=RenderConfig(views=("axial", "coronal"), num_slices=2, start_from="first",
                                           difference=False, panel_px=128))
    names = sorted(p.name for p in out)
    assert names == sorted(["axial_000_motion.gif", "axial_001_motion.gif", "coronal_000_motion.gif",
                            "coronal_001_motion.gif", "render.json"])
    for p in out:
        if p.suffix == ".gif":
            assert gif_frames(p) == (10, (128, 128)), p.name
    stack = iio.imread(tmp_path / "axial_000_motion.gif", index=None)
    assert stack.shape[:3] == (10, 128, 128)
    assert not np.array_equal(stack[0], stack[5])  # the motion is visible
    man = json.loads((tmp_path / "render.json").read_text())
    assert man["frame_count"] == 10 and man["views"]["coronal"]["slices"] == [0, 1]
    assert man["views"]["coronal"]["pixel_mm"] == [SPACING[0], SPACING[2]]
    assert man["max_displacement_mm"] == pytest.approx(max(f.magnitude().max() for f in fields), rel=1e-5)


def test_heatmap_difference_and_real_vs_generated(tmp_path):
    ref, fields = cycle()
    real = [Volume(ref.array.copy(), ref.geometry)] * 10  # a 'real' study without motion
    out = render_cycle(tmp_path, reference=ref, fields=fields, real_phases=real, real_fields=[None] * 10,
                       views=("sagittal",), style="heatmap", panel_px=128, name="P1_")
    idx = SHAPE[2] // 2
    assert sorted(p.name for p in out) == sorted([f"P1_sagittal_{idx:03d}_{k}.gif" for k in ("motion", "diff", "compare")]
                                                 + ["P1_render.json"])
    assert gif_frames(tmp_path / f"P1_sagittal_{idx:03d}_diff.gif") == (10, (128, 128))
    assert gif_frames(tmp_path / f"P1_sagittal_{idx:03d}_compare.gif") == (10, (3 * 128, 128))


def test_bad_inputs_are_reported():
    ref, fields = cycle()
    with pytest.raises(ValueError, match="9 fields for 10 phases"):
        render_cycle("unused", [ref] * 10, fields[:9])
    with pytest.raises(ValueError, match="views"):
        render_cycle("unused", [ref] * 10, views=("axial", "oblique"))
    other = DisplacementField(np.zeros((3, 4, 4, 4), np.float32), Geometry((4, 4, 4)))
    with pytest.raises(ValueError, match="geometry"):
        render_cycle("unused", [ref] * 2, [None, other])


def test_mp4_written_or_clearly_skipped(tmp_path, caplog):
    frames = [np.full((64, 64, 3), v, np.uint8) for v in (0, 128, 255)]
    with caplog.at_level(logging.WARNING, logger="respmotion"):
        res = write_mp4(tmp_path / "a.mp4", frames, fps=2)
    if ffmpeg_available():
        assert res is not None and res.stat().st_size > 0
    else:
        assert res is None and not (tmp_path / "a.mp4").exists()
        assert MP4_UNAVAILABLE in caplog.text


# ------------------------------------------------------------------ CLI on our layout
def write_study(root, patient="101_TEST", study="study_0"):
    ref, fields = cycle()
    sd = StudyDir(root / patient / study)
    from respmotion.core.ops import warp_volume

    for p, f in zip(PHASES, fields):
        sd.save_phase(p, warp_volume(ref, f))
        sd.save_gt("ref", p, f)
        write_npy(sd.mask_path("lung", p), (warp_volume(ref, f).array < -900).astype(np.uint8))
    sd.mark_complete({"phases": list(PHASES)})
    return sd, fields


def test_cli_render_gt_and_generated_fields(tmp_path, capsys):
    data = tmp_path / "data"
    sd, fields = write_study(data)
    out = tmp_path / "gt"
    rc = main(["render", "--data", str(data), "--patient", "101", "--fields", "gt", "--views", "coronal",
               "--contours", "lung", "--fps", "4", "--out", str(out), "render.panel_px=96"])
    assert rc == 0
    files = sorted(p.name for p in (out / "101_TEST" / "study_0").iterdir())
    assert files == ["101_TEST_study_0_coronal_010_diff.gif", "101_TEST_study_0_coronal_010_motion.gif",
                     "101_TEST_study_0_render.json"]
    assert (out / "render_config.yaml").exists()
    with Image.open(out / "101_TEST" / "study_0" / files[1]) as im:
        assert im.n_frames == 10 and im.info["duration"] == 250

    gen = tmp_path / "gen"
    for p, f in zip(PHASES[1:], fields[1:]):
        save_field(DisplacementField(0.5 * f.array, f.geometry), gen / f"dvf_{p:02d}.nii.gz")
    out2 = tmp_path / "cmp"
    rc = main(["render", "--data", str(data), "--fields", str(gen), "--views", "axial", "--heatmap",
               "--out", str(out2), "render.panel_px=96", "render.difference=false"])
    assert rc == 0
    files = sorted(p.name for p in (out2 / "101_TEST" / "study_0").iterdir())
    assert files == ["101_TEST_study_0_axial_006_compare.gif", "101_TEST_study_0_axial_006_motion.gif",
                     "101_TEST_study_0_render.json"]
    assert gif_frames(out2 / "101_TEST" / "study_0" / files[0]) == (10, (3 * 96, 96))


def test_cli_errors_are_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    write_study(data)
    assert main(["render", "--data", str(data), "--patient", "999", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no complete study of patient '999'" in err and len(err.splitlines()) == 1
    assert main(["render", "--data", str(data), "--patient", "TEST", "--out", str(tmp_path / "o")]) == 2
    capsys.readouterr()
    assert main(["render", "--data", str(data), "--views", "axial,frontal", "--out", str(tmp_path / "o")]) == 2
    assert "views must be" in capsys.readouterr().err
    assert main(["render", "--data", str(data), "--fields", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "field folder not found" in capsys.readouterr().err
