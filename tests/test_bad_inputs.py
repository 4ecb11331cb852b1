"""Catalogue of bad inputs, each through the CLI as a user would meet it.

Every case must give: exit code != 0, **exactly one** line on stderr (no traceback, no usage
text, no log lines around it) that names the offending file and says what is wrong, and nothing
half-written (no partial outputs, no ``.tmp-*`` files).  tqdm progress bars are not counted
(they are progress, not messages; a terminal overwrites them).

Cases: corrupt DICOM, missing phase, NaN voxels, wrong shape/ndim, empty folder, unreadable
checkpoint, checkpoint of another model kind, config with unknown keys.  Commands run in
process through :func:`respmotion.cli.main` with stderr captured; the root logger is reset so
``run_command``'s ``logging.basicConfig`` writes to stderr as it does for a user.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from dicom_factory import write_ct_series, write_study

SHAPE = (16, 64, 64)
PROGRESS = re.compile(r"^[\w ./-]*: *(\d+%\||\d+\w* \[)")  # a tqdm bar: "scan:  40%|####  | 4/10 [..." or "prepare: 0series [..."


# ---------------------------------------------------------------------------- helpers
@dataclass
class Case:
    argv: list[str]
    names: str  # the offending file: its name must appear in the error line
    problem: str  # regex (case-insensitive) the error line must match: what is wrong
    clean: list[Path] = field(default_factory=list)  # must not exist afterwards (or hold no data files)
    allowed: tuple[str, ...] = ()  # file names a failed run may leave in a clean folder (reports, configs)


@pytest.fixture
def cli(capsys):
    """Run ``respmotion ARGV`` in process; returns ``(exit code, stderr lines)``."""
    from respmotion.cli import main

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def run(argv: list[str]) -> tuple[int, list[str]]:
        root.handlers = []  # so basicConfig installs a stderr handler like in a real run
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors
            rc = exc.code if isinstance(exc.code, int) else 1
        finally:
            root.handlers = saved_handlers[:]
            root.setLevel(saved_level)
        err = capsys.readouterr().err
        return rc, [ln for ln in re.split(r"[\r\n]+", err) if ln.strip() and not PROGRESS.match(ln)]

    yield run
    root.handlers, root.level = saved_handlers, saved_level


def check(cli, case: Case) -> None:
    rc, lines = cli(case.argv)
    shown = "\n".join(lines) or "(nothing)"
    cmd = "respmotion " + " ".join(map(str, case.argv))
    assert rc != 0, f"{cmd}\n  exit code 0 (accepted silently); stderr:\n{shown}"
    assert len(lines) == 1, f"{cmd}\n  exit {rc}, expected exactly one stderr line, got {len(lines)}:\n{shown}"
    line = lines[0]
    assert case.names in line, f"{cmd}\n  the error line does not name {case.names!r}:\n{line}"
    assert re.search(case.problem, line, re.I), f"{cmd}\n  the error line does not say /{case.problem}/:\n{line}"
    assert "Traceback" not in line
    for p in case.clean:
        if p.is_dir():
            left = [f for f in p.rglob("*") if f.is_file() and f.name not in case.allowed]
            assert not left, f"{cmd}\n  left files behind in {p}: {[str(f.relative_to(p)) for f in left]}"
        else:
            assert not p.exists(), f"{cmd}\n  left {p} behind"
        tmp = [f for f in p.parent.rglob(".tmp-*")] if p.parent.exists() else []
        assert not tmp, f"{cmd}\n  left temporary files: {tmp}"


def registered(command: str) -> None:
    """Fail clearly (not with a usage dump) when a subcommand is not in the CLI yet."""
    from respmotion.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert command in sub.choices, (f"'respmotion {command}' is not registered in respmotion.cli "
                                    f"(COMMAND_MODULES); this case cannot run through the CLI")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A 1-patient 16x64x64 phantom cohort (copied per test when modified)."""
    from respmotion.data.phantom import write_cohort

    root = tmp_path_factory.mktemp("bad_cohort") / "cohort"
    write_cohort(root, 1, seed=5, shape=SHAPE)
    return root


def copy_cohort(cohort: Path, dest: Path) -> Path:
    shutil.copytree(cohort, dest)
    return dest


def study_of(root: Path) -> Path:
    return next(p for p in root.glob("*/*") if (p / "study.json").exists())


def ct_array(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.full((6, 24, 24), -900.0)
    a[:, 6:18, 6:18] = 40.0
    return a + rng.normal(0, 5, a.shape).round()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny image / DVF autoencoder checkpoints in the engine's format (``Trainer.state(full=False)``)."""
    from respmotion.models.autoencoder import Autoencoder, default_net_config
    from respmotion.training.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind in ("image", "dvf"):
        net = default_net_config(kind, base_channels=8, channel_mults=(1, 2), norm_groups=4)
        model = Autoencoder(net)
        out[kind] = save_checkpoint({"task": f"autoencoder_{kind}", "step": 1, "model": model.state_dict(),
                                     "model_config": net.to_dict(), "extra": {"kind": kind, "latent_scale": 1.0},
                                     "config": {}, "history": {"train": [], "val": []}}, d / f"{kind}.pt")
    return out


# ---------------------------------------------------------------------------- corrupt DICOM
def test_corrupt_dicom_file_import(cli, tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 10)
    out = tmp_path / "out" / "ct.npy"
    check(cli, Case(["data", "import", bad, "--out", out], "scan.dcm", r"not a readable DICOM|cannot|corrupt|invalid",
                    [out.parent]))


def test_truncated_pixel_data_import(cli, tmp_path):
    paths = write_ct_series(tmp_path / "series", ct_array(), series_description="CT")
    victim = paths[3]
    victim.write_bytes(victim.read_bytes()[:-100])  # header intact, pixel data cut short
    out = tmp_path / "out" / "ct.npy"
    check(cli, Case(["data", "import", tmp_path / "series", "--out", out], victim.name,
                    r"not a readable|cannot decode|truncat|pixel", [out.parent]))


def test_truncated_header_top_slice_import(cli, tmp_path):
    """The top slice cut inside its header: must not be dropped silently (a 5-slice CT from 6 files)."""
    paths = write_ct_series(tmp_path / "series", ct_array(), series_description="CT")
    victim = paths[-1]
    victim.write_bytes(victim.read_bytes()[:600])
    out = tmp_path / "out" / "ct.npy"
    check(cli, Case(["data", "import", tmp_path / "series", "--out", out], victim.name,
                    r"not a readable|cannot|truncat|incomplete|missing", [out.parent]))


def test_truncated_slice_in_prepare(cli, tmp_path):
    _, files = write_study(tmp_path / "dicom", ct_array(1), patient_id="100_BAD")
    victim = files[40][2]
    victim.write_bytes(victim.read_bytes()[:-100])  # pixel data cut short
    out = tmp_path / "prepared"
    check(cli, Case(["data", "prepare", "--src", tmp_path / "dicom", "--out", out, "--shape", "6,24,24",
                     "--workers", "1"], victim.name, r"not a readable|cannot decode|truncat|pixel",
                    [out], allowed=("prepare_report.json", "prepare_config.yaml")))


# ---------------------------------------------------------------------------- missing phase
def test_missing_phase_in_prepare(cli, tmp_path):
    write_study(tmp_path / "dicom", ct_array(2), phases=[p for p in range(0, 100, 10) if p != 90],
                patient_id="101_NINE")
    out = tmp_path / "prepared"
    check(cli, Case(["data", "prepare", "--src", tmp_path / "dicom", "--out", out, "--shape", "6,24,24",
                     "--workers", "1"], "101_NINE", r"missing phase.*90",
                    [out], allowed=("prepare_report.json", "prepare_config.yaml")))


def test_missing_phase_file_in_cohort_render(cli, cohort, tmp_path):
    data = copy_cohort(cohort, tmp_path / "cohort")
    victim = study_of(data) / "phase_50.npy"
    victim.unlink()
    out = tmp_path / "gifs"
    check(cli, Case(["render", "--data", data, "--out", out, "--views", "axial"], "phase_50.npy", r"missing|not found|no such",
                    [out], allowed=("render_config.yaml",)))


# ---------------------------------------------------------------------------- NaN voxels
def _nifti(path: Path, arr_zyx: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr_zyx.transpose(2, 1, 0)).astype(np.float32), np.eye(4)), str(path))
    return path


def test_nan_voxels_import(cli, tmp_path):
    arr = ct_array(3).astype(np.float32)
    arr[2, 5, 5] = np.nan
    src = _nifti(tmp_path / "nan_ct.nii.gz", arr)
    out = tmp_path / "out" / "ct.npy"
    check(cli, Case(["data", "import", src, "--out", out], "nan_ct.nii.gz", r"nan|not finite|non-finite", [out.parent]))


def test_nan_voxels_synthesize(cli, cohort, tmp_path):
    data = copy_cohort(cohort, tmp_path / "cohort")
    study = study_of(data)
    arr = np.load(study / "phase_00.npy")
    arr[8, 30, 30] = np.nan
    np.save(study / "phase_00.npy", arr)
    out = tmp_path / "synth"
    check(cli, Case(["synthesize", study, "--model", "gt", "--out", out, "--no-render"], "phase_00",
                    r"nan|not finite|non-finite", [out]))


# ---------------------------------------------------------------------------- wrong shape / ndim
def test_2d_image_import(cli, tmp_path):
    import nibabel as nib

    src = tmp_path / "slice2d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 24), np.float32), np.eye(4)), str(src))
    out = tmp_path / "out" / "ct.npy"
    check(cli, Case(["data", "import", src, "--out", out], "slice2d.nii.gz", r"3D|shape|dimension", [out.parent]))


def test_wrong_ndim_phase_in_cohort_synthesize(cli, cohort, tmp_path):
    data = copy_cohort(cohort, tmp_path / "cohort")
    study = study_of(data)
    np.save(study / "phase_00.npy", np.zeros((64, 64), np.float32))
    out = tmp_path / "synth"
    check(cli, Case(["synthesize", study, "--model", "gt", "--out", out, "--no-render"], "phase_00.npy",
                    r"3D|shape|dimension", [out]))


def test_wrong_shape_field_in_render(cli, cohort, tmp_path):
    from respmotion.core.geometry import Geometry
    from respmotion.core.types import DisplacementField
    from respmotion.io.volumes import save_field

    fields = tmp_path / "fields"
    g = Geometry((8, 32, 32), (6.0, 2.8, 2.8))
    for k in range(0, 100, 10):
        save_field(DisplacementField(np.zeros((3, 8, 32, 32), np.float32), g), fields / f"dvf_{k:02d}.npy")
    out = tmp_path / "gifs"
    check(cli, Case(["render", "--data", cohort, "--out", out, "--fields", fields, "--views", "axial"], "dvf_",
                    r"grid|shape|differ", [out], allowed=("render_config.yaml",)))


# ---------------------------------------------------------------------------- empty folder
def test_empty_folder_prepare(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "prepared"
    check(cli, Case(["data", "prepare", "--src", tmp_path / "empty", "--out", out], "empty", r"no DICOM",
                    [out], allowed=("prepare_config.yaml", "prepare_report.json")))


def test_empty_folder_import(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out" / "ct.npy"
    check(cli, Case(["data", "import", tmp_path / "empty", "--out", out], "empty", r"no DICOM", [out.parent]))


def test_empty_folder_render(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "gifs"
    check(cli, Case(["render", "--data", tmp_path / "empty", "--out", out], "empty", r"no complete study|no stud",
                    [out], allowed=("render_config.yaml",)))


def test_empty_folder_synthesize(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "synth"
    check(cli, Case(["synthesize", tmp_path / "empty", "--model", "gt", "--out", out, "--no-render"], "empty",
                    r"no DICOM|empty|no .*(ct|volume|image)", [out]))


def test_empty_folder_register(cli, tmp_path):
    registered("register")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "reg"
    check(cli, Case(["register", "--data", tmp_path / "empty", "--out", out], "empty", r"no (complete )?stud",
                    [out], allowed=("register_config.yaml",)))


def test_empty_folder_train(cli, tmp_path):
    registered("train")
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    check(cli, Case(["train", "autoencoder", "--kind", "image", "--data", tmp_path / "empty", "--run-dir", run,
                     "--device", "cpu"], "empty", r"no (training )?(patients|stud)", [run]))


# ---------------------------------------------------------------------------- checkpoints
def test_unreadable_checkpoint_latents(cli, cohort, checkpoints, tmp_path):
    registered("latents")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint" * 20)
    out = tmp_path / "latents"
    check(cli, Case(["latents", "--data", cohort, "--image-ae", bad, "--dvf-ae", checkpoints["dvf"], "--out", out,
                     "--device", "cpu"], "garbage.pt", r"not a readable checkpoint", [out]))


def test_truncated_checkpoint_resume(cli, cohort, checkpoints, tmp_path):
    registered("train")
    run = tmp_path / "run"
    run.mkdir()
    good = checkpoints["image"].read_bytes()
    (run / "00000002.pt").write_bytes(good[: len(good) // 2])  # a checkpoint cut short (a foreign copy, not ours)
    (run / "config.yaml").write_text(f"kind: image\ndata:\n  root: {cohort}\n")
    before = sorted(p.name for p in run.iterdir())
    check(cli, Case(["train", "autoencoder", "--resume", run, "--device", "cpu"], "00000002.pt",
                    r"not a readable checkpoint"))
    assert sorted(p.name for p in run.iterdir()) == before, "a failed resume changed the run folder"


def test_checkpoint_of_other_kind_latents(cli, cohort, checkpoints, tmp_path):
    registered("latents")
    out = tmp_path / "latents"
    # image and DVF autoencoders swapped
    check(cli, Case(["latents", "--data", cohort, "--image-ae", checkpoints["dvf"], "--dvf-ae", checkpoints["image"],
                     "--out", out, "--device", "cpu"], "dvf.pt", r"expected an image .*autoencoder|kind", [out]))


def test_checkpoint_of_other_kind_resume(cli, cohort, checkpoints, tmp_path):
    """Resuming an image-AE run from a DVF checkpoint (same engine format, other task)."""
    registered("train")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoints["dvf"], run / "00000001.pt")
    (run / "config.yaml").write_text(f"kind: image\ndata:\n  root: {cohort}\n")
    check(cli, Case(["train", "autoencoder", "--resume", run, "--device", "cpu"], "00000001.pt",
                    r"task|kind|autoencoder_dvf"))
    assert sorted(p.name for p in run.iterdir()) == ["00000001.pt", "config.yaml"]


# ---------------------------------------------------------------------------- config
def test_config_with_unknown_key(cli, tmp_path):
    cfg = tmp_path / "phantom.yaml"
    cfg.write_text("patients: 1\nshape: [8, 32, 32]\ncolour: red\n")
    out = tmp_path / "ph"
    check(cli, Case(["phantom", "--config", cfg, "--out", out], "phantom.yaml", r"unknown config key 'colour'", [out]))


def test_config_with_unknown_nested_key(cli, cohort, tmp_path):
    cfg = tmp_path / "render.yaml"
    cfg.write_text("render:\n  fps: 3\n  colormap: jet\n")
    out = tmp_path / "gifs"
    check(cli, Case(["render", "--config", cfg, "--data", cohort, "--out", out], "render.yaml",
                    r"unknown config key 'render.colormap'", [out]))


def test_unknown_override_key(cli, tmp_path):
    out = tmp_path / "ph"
    check(cli, Case(["phantom", "--out", out, "patiens=2"], "patiens", r"unknown config key", [out]))
