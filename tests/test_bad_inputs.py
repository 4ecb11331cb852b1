"""Catalogue of bad inputs, each through the CLI as a user would meet it.

Every case must give: exit code != 0, **exactly one** line on stderr (no traceback, no usage
text, no log lines around it) that names the offending file and says what is wrong, and nothing
half-written (no partial outputs, no ``.tmp-*`` files).  tqdm progress bars are not counted
(they are progress, not messages; a terminal overwrites them).

Cases: corrupt DICOM, missing phase, NaN voxels, wrong shape/ndim, empty folder, unreadable
checkpoint, checkpoint of another model kind, config with unknown keys; and hostile inputs
(below their banner): no write permission, ``--out`` an existing file, disk full (ENOSPC raised
in process), zero-byte and misfit checkpoints, sizes 0 or too large for the memory, truncated
registration files, tilted-gantry / skewed / UID-sharing DICOM, negative config values, partial
latent inputs, folders written by two runs (owner manifest and lock), overrides after flags.  Commands run in
process through :func:`respmotion.cli.main` with stderr captured; the root logger is reset so
``run_command``'s ``logging.basicConfig`` writes to stderr as it does for a user.
"""

from __future__ import annotations

import json
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
    from respmotion.io.checkpoint import save_checkpoint

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


def test_norm_groups_that_do_not_divide_the_channels_refused(cli, cohort, tmp_path):
    run = tmp_path / "run"
    check(cli, Case(["train", "autoencoder", "--kind", "image", "--data", cohort, "--run-dir", run, "--device", "cpu",
                     "model.base_channels=8", "model.norm_groups=3"], "model.norm_groups=3", r"does not divide",
                    [run]))


def test_overwrite_with_a_bad_ct_keeps_the_earlier_output(cli, cohort, tmp_path):
    """--overwrite empties --out only once every input was read and checked: a bad CT leaves it as it was."""
    import nibabel as nib

    out = tmp_path / "out"
    rc, _ = cli(["synthesize", study_of(cohort), "--model", "gt", "--out", out, "--no-render"])
    assert rc == 0
    before = tree(out)
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image((np.arange(4 * 16 * 16).reshape(16, 16, 4) % 2).astype(np.float32), np.eye(4)), mask)
    check(cli, Case(["synthesize", mask, "--out", out, "--overwrite", "--no-render"], "mask.nii.gz", r"mask", []))
    assert tree(out) == before


def test_precision_is_for_a_bundle(cli, cohort, tmp_path):
    """--precision sets a diffusion bundle's networks; with the phantom's fields (no network) it is refused."""
    out = tmp_path / "out"
    check(cli, Case(["synthesize", study_of(cohort), "--model", "gt", "--precision", "bf16", "--out", out,
                     "--no-render"], "--precision bf16", r"only a diffusion bundle", [out]))


def test_bundle_folder_without_checkpoints_refused(cli, cohort, tmp_path):
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    bundle.mkdir()
    (bundle / "config.yaml").write_text("model: {}\n")
    check(cli, Case(["synthesize", study_of(cohort) / "phase_00.npy", "--model", bundle, "--out", out], str(bundle),
                    r"not a model bundle", [out]))


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


# ============================================================================ hostile inputs
# Each case of the catalogue (tracebacks, silent accepts, mixed outputs, weak messages, small
# defects) through the CLI in process: one line naming the file and the problem, exit code 2, and
# nothing already written changed (``tree`` compares file bytes before and after).
TINY = "4,16,16"  # phantom CLI runs
REG_YAML = ("pairs: ref\nthreads: 1\nbatch_size: 0\nffd:\n  stride: [2.0, 8.0, 8.0]\n  levels: [[1, 1, 1]]\n"
            "  iterations: [2]\n  lr_mm: [0.3]\n  subsample: [[1, 2, 2]]\n  repair_folding: false\n")
TRAIN_OVERRIDES = ["model.base_channels=8", "model.norm_groups=4", "model.channel_mults=[1,2]", "model.dropout=0.0",
                   "image_loss.views=[axial]", "train.num_workers=0", "train.val_every=0", "train.image_every=0",
                   "train.log_every=1", "train.warmup_steps=0", "train.batch_size=1", "data.phases=[0]",
                   "data.patient_split.ratios=[1.0,0.0,0.0]"]


def tree(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` except the ownership lock files."""
    from respmotion.io.atomic import file_sha256

    if not root.exists():
        return {}
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".owner")}


def no_tmp(root: Path) -> None:
    left = [str(p) for p in root.rglob(".tmp-*")] if root.exists() else []
    assert not left, f"temporary files left: {left}"


def deny_writes(monkeypatch, root: Path) -> None:
    """Writing under ``root`` fails with EACCES, as in a folder without write permission (tests may
    run as root, which chmod does not stop): ``os.open`` for writing and ``os.mkdir`` are refused."""
    import errno
    import os

    real_open, real_mkdir, top = os.open, os.mkdir, str(root.resolve())

    def under(path) -> bool:
        return os.path.abspath(os.fsdecode(path)).startswith(top)

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if under(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def disk_full_after(monkeypatch, ok_writes: int) -> None:
    """The disk fills up after ``ok_writes`` atomic writes: the next ones fail with ENOSPC."""
    import errno
    import os

    real, calls = os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] > ok_writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture(scope="module")
def nifti_ct(tmp_path_factory) -> Path:
    return _nifti(tmp_path_factory.mktemp("nifti") / "ct.nii.gz", ct_array(7).astype(np.float32))


def _argv(command: str, out: Path, cohort: Path, nifti: Path) -> list:
    study = study_of(cohort)
    return {
        "phantom": ["phantom", "--out", out, "--patients", "1", "--shape", TINY],
        "import": ["data", "import", nifti, "--out", out / "ct.npy"],
        "register": ["register", "--data", cohort, "--out", out],
        "render": ["render", "--data", cohort, "--out", out, "--views", "axial"],
        "train": ["train", "autoencoder", "--kind", "image", "--data", cohort, "--run-dir", out, "--device", "cpu",
                  "--steps", "1", *TRAIN_OVERRIDES],
        "synthesize": ["synthesize", study, "--model", "gt", "--out", out, "--no-render"],
    }[command]


COMMANDS = ("phantom", "import", "register", "render", "train", "synthesize")


# ---------------------------------------------------------------------------- tracebacks -> one line
@pytest.mark.parametrize("command", COMMANDS)
def test_no_write_permission_on_out(cli, cohort, nifti_ct, tmp_path, monkeypatch, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes(monkeypatch, locked)
    check(cli, Case(_argv(command, locked / "out", cohort, nifti_ct), str(locked), r"permission", [locked]))


@pytest.mark.parametrize("command", COMMANDS)
def test_out_is_an_existing_file(cli, cohort, nifti_ct, tmp_path, command):
    taken = tmp_path / "taken"
    taken.write_text("a user's file\n")
    check(cli, Case(_argv(command, taken, cohort, nifti_ct), str(taken), r"is a file|not a (folder|directory)"))
    assert taken.read_text() == "a user's file\n"


@pytest.mark.parametrize("command, ok_writes", [("phantom", 3), ("import", 1), ("train", 3), ("synthesize", 3)])
def test_disk_full(cli, cohort, nifti_ct, tmp_path, monkeypatch, command, ok_writes):
    out = tmp_path / "out"
    disk_full_after(monkeypatch, ok_writes)  # a few files fit, then the disk is full
    rc, lines = cli(_argv(command, out, cohort, nifti_ct))
    errors = [ln for ln in lines if ": error:" in ln]  # training logs its progress before the failure
    assert rc == 2 and len(errors) == 1 and re.search(r"no space left", errors[0]), lines
    assert str(out) in errors[0] and not any("Traceback" in ln for ln in lines), lines
    no_tmp(out)
    assert not list(out.rglob("study.json")) and not list(out.rglob("*.pt")), "a failed run marked output complete"
    if command == "import":  # the volume and its sidecar are written together or not at all
        assert not list(out.rglob("*.npy")) and not list(out.rglob("*.json"))


def test_disk_full_phantom_then_rerun_completes(cli, tmp_path, monkeypatch):
    out = tmp_path / "ph"
    with monkeypatch.context() as m:
        disk_full_after(m, 5)
        assert cli(["phantom", "--out", out, "--patients", "1", "--shape", TINY])[0] == 2
    rc, lines = cli(["phantom", "--out", out, "--patients", "1", "--shape", TINY])
    assert rc == 0, lines
    assert (out / "phantom_000" / "study_0" / "study.json").exists()
    no_tmp(out)


def test_zero_byte_checkpoint(cli, cohort, checkpoints, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    out = tmp_path / "latents"
    check(cli, Case(["latents", "--data", cohort, "--image-ae", empty, "--dvf-ae", checkpoints["dvf"], "--out", out,
                     "--device", "cpu"], "empty.pt", r"not a readable checkpoint.*(empty|cut short)", [out]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "00000001.pt").write_bytes(b"")
    (run / "config.yaml").write_text(f"kind: image\ndata:\n  root: {cohort}\n")
    before = tree(run)
    check(cli, Case(["train", "autoencoder", "--resume", run, "--device", "cpu"], "00000001.pt",
                    r"not a readable checkpoint"))
    assert tree(run) == before


def _misfit_checkpoint(path: Path) -> Path:
    """An image-AE training checkpoint whose weights are of a wider network than its config says."""
    from respmotion.models.autoencoder import Autoencoder, default_net_config
    from respmotion.io.checkpoint import save_checkpoint

    small = default_net_config("image", base_channels=8, channel_mults=(1, 2), norm_groups=4)
    wide = Autoencoder(default_net_config("image", base_channels=16, channel_mults=(1, 2), norm_groups=4))
    return save_checkpoint({"task": "autoencoder_image", "step": 1, "model": wide.state_dict(),
                            "model_config": small.to_dict(), "extra": {"kind": "image", "latent_scale": 1.0},
                            "config": {}, "history": {"train": [], "val": []}, "optimizer": {}, "scheduler": {},
                            "rng": []}, path)


def test_weights_do_not_fit_model_config_resume(cli, cohort, tmp_path):
    run = tmp_path / "run"
    _misfit_checkpoint(run / "00000001.pt")
    (run / "config.yaml").write_text(f"kind: image\ndata:\n  root: {cohort}\nmodel:\n  base_channels: 8\n"
                                     f"  channel_mults: [1, 2]\n  norm_groups: 4\n")
    before = tree(run)
    check(cli, Case(["train", "autoencoder", "--resume", run, "--device", "cpu"], "00000001.pt",
                    r"weights do not fit"))
    assert tree(run) == before


def test_weights_do_not_fit_model_config_latents(cli, cohort, checkpoints, tmp_path):
    bad = _misfit_checkpoint(tmp_path / "misfit.pt")
    out = tmp_path / "latents"
    check(cli, Case(["latents", "--data", cohort, "--image-ae", bad, "--dvf-ae", checkpoints["dvf"], "--out", out,
                     "--device", "cpu"], "misfit.pt", r"weights do not fit", [out]))


@pytest.mark.parametrize("argv", [["phantom", "--shape", "0,16,16"], ["data", "prepare", "--src", ".", "--shape", "0,8,8"],
                                  ["data", "import", "ct.nii.gz", "--shape", "4,0,8"]])
def test_shape_with_a_zero(cli, tmp_path, argv):
    out = tmp_path / "out"
    check(cli, Case([*argv, "--out", out], "shape", r"positive", [out]))


@pytest.mark.parametrize("argv", [["phantom", "--patients", "1"], ["data", "import", "CT"],
                                  ["data", "prepare", "--src", "SRC", "--workers", "1"]])
def test_shape_too_large_for_memory(cli, nifti_ct, tmp_path, argv):
    """One allocation estimate (runtime.check_allocation) refuses a shape before anything is read or written."""
    (tmp_path / "src").mkdir()
    out = tmp_path / "out"
    argv = [nifti_ct if a == "CT" else tmp_path / "src" if a == "SRC" else a for a in argv]
    target = out / "ct.npy" if "import" in argv else out
    check(cli, Case([*argv, "--out", target, "--shape", "5000,5000,5000"], "5000x5000x5000",
                    r"needs about [\d,.]+ GiB.*available", [out]))


# ---------------------------------------------------------------------------- registration reruns
@pytest.fixture
def registered_cohort(cli, cohort, tmp_path) -> tuple[Path, Path, Path]:
    data = copy_cohort(cohort, tmp_path / "cohort")
    cfg = tmp_path / "reg.yaml"
    cfg.write_text(REG_YAML)
    out = tmp_path / "reg"
    rc, lines = cli(["register", "--data", data, "--out", out, "--config", cfg])
    assert rc == 0, lines
    return data, out, cfg


def test_truncated_registration_npz_is_redone(cli, registered_cohort):
    from respmotion.registration.bspline import load_bspline

    data, out, cfg = registered_cohort
    victim = next(out.glob("*/*/ref_50.npz"))
    victim.write_bytes(victim.read_bytes()[:200])  # a copy cut short
    others = {k: v for k, v in tree(out).items() if "ref_50" not in k and not k.endswith(".yaml")}
    rc, lines = cli(["register", "--data", data, "--out", out, "--config", cfg])
    assert rc == 0 and any("ref_50.npz: unreadable" in ln for ln in lines), lines
    load_bspline(victim)  # redone, readable
    assert {k: v for k, v in tree(out).items() if k in others} == others  # finished pairs untouched


def test_register_after_images_replaced_redoes_their_pairs(cli, registered_cohort):
    from respmotion.io.atomic import file_sha256, read_json

    data, out, cfg = registered_cohort
    study = study_of(data)
    (study / "phase_50.npy").write_bytes((study / "phase_40.npy").read_bytes())  # the cohort's image replaced
    rc, lines = cli(["register", "--data", data, "--out", out, "--config", cfg])
    assert rc == 0, lines
    rec = read_json(next(out.glob("*/*/ref_50.json")))
    role = "fixed" if rec["fixed_phase"] == 50 else "moving"
    assert rec["inputs"][f"{role}_sha256"] == file_sha256(study / "phase_50.npy")  # not the stale field
    assert any("ref_50.npz: computed from other phase images" in ln for ln in lines), lines


def test_register_with_other_settings_refused_then_overwrite(cli, registered_cohort):
    data, out, cfg = registered_cohort
    before = tree(out)
    check(cli, Case(["register", "--data", data, "--out", out, "--config", cfg, "reference=50"], str(out),
                    r"another `respmotion register` run \(settings.reference=0 \(this run: 50\)\).*--overwrite"))
    assert tree(out) == before


# ---------------------------------------------------------------------------- silent accepts -> refused
def _rewrite(paths: list[Path], edit: Callable) -> None:
    import pydicom

    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        edit(k, ds)
        ds.save_as(p, enforce_file_format=True)


def test_tilted_gantry_series_refused(cli, tmp_path):
    import math

    paths = write_ct_series(tmp_path / "tilted", ct_array(), spacing_zyx=(3.0, 1.0, 1.0), shuffle=False)
    shear = 3.0 * math.tan(math.radians(10))  # mm along y per slice: a 10 degree gantry tilt

    def tilt(k, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.4f}", f"{y + k * shear:.4f}", f"{z:.4f}"]
        ds.GantryDetectorTilt = "10"

    _rewrite(paths, tilt)
    out = tmp_path / "out" / "ct.npy"
    check(cli, Case(["data", "import", tmp_path / "tilted", "--out", out], "tilted", r"tilted gantry", [out.parent]))


def test_non_orthonormal_orientation_refused(cli, tmp_path):
    write_ct_series(tmp_path / "skew", ct_array(), orientation=(1, 0, 0, 0.5, 1, 0))
    out = tmp_path / "out" / "ct.npy"
    check(cli, Case(["data", "import", tmp_path / "skew", "--out", out], "skew",
                    r"ImageOrientationPatient .* not two orthogonal unit vectors", [out.parent]))


@pytest.mark.parametrize("what", ["same_headers", "other_description"])
def test_two_exports_sharing_one_series_uid_refused(cli, tmp_path, what):
    from pydicom.uid import generate_uid

    uid, study, frame = generate_uid(), generate_uid(), generate_uid()
    common = dict(series_uid=uid, study_uid=study, frame_of_reference_uid=frame, series_description="CT")
    write_ct_series(tmp_path / "ct" / "export_a", ct_array(1), **common)
    if what == "other_description":
        common["series_description"] = "CT 2"
    write_ct_series(tmp_path / "ct" / "export_b", ct_array(2), origin_xyz=(0, 0, 18.0), file_prefix="B", **common)
    out = tmp_path / "out" / "ct.npy"
    check(cli, Case(["data", "import", tmp_path / "ct", "--out", out], uid,
                    r"share SeriesInstanceUID.*(InstanceNumber|SeriesDescription)", [out.parent]))


@pytest.mark.parametrize("bad", ["patients: -2", "noise_hu: -5", "shape: [-4, 16, 16]", "seed: -1"])
def test_phantom_bad_values_in_yaml(cli, tmp_path, bad):
    cfg = tmp_path / "phantom.yaml"
    cfg.write_text(f"patients: 1\nshape: [4, 16, 16]\n{bad}\n")
    out = tmp_path / "ph"
    check(cli, Case(["phantom", "--config", cfg, "--out", out], "phantom.yaml", bad.split(":")[0] + r".*(>= 0|>= 1|positive)",
                    [out]))


def test_latents_with_a_missing_gt_field_refused(cli, cohort, checkpoints, tmp_path):
    data = copy_cohort(cohort, tmp_path / "cohort")
    (study_of(data) / "gt" / "dvf_step_30.npy").unlink()
    out = tmp_path / "latents"
    check(cli, Case(["latents", "--data", data, "--image-ae", checkpoints["image"], "--dvf-ae", checkpoints["dvf"],
                     "--out", out, "--device", "cpu"], "dvf_step_30.npy", r"missing", [out]))


# ---------------------------------------------------------------------------- mixed outputs -> owned folders
def test_phantom_rerun_with_other_seed_refused_then_overwrite(cli, tmp_path):
    import yaml

    out = tmp_path / "ph"
    assert cli(["phantom", "--out", out, "--patients", "1", "--shape", TINY, "--seed", "1"])[0] == 0
    before = tree(out)
    for change in (["--seed", "2"], ["--shape", "4,16,20"], ["--patients", "2"]):
        argv = ["phantom", "--out", out, "--patients", "1", "--shape", TINY, "--seed", "1"]
        argv[argv.index(change[0]) + 1] = change[1]
        check(cli, Case(argv, str(out), r"another `respmotion phantom` run.*--overwrite"))
        assert tree(out) == before
    rc, lines = cli(["phantom", "--out", out, "--patients", "1", "--shape", TINY, "--seed", "2", "--overwrite"])
    assert rc == 0, lines
    info = json.loads((out / "phantom_000" / "study_0" / "study.json").read_text())
    assert info["seed"] == 2000 and yaml.safe_load((out / "phantom_config.yaml").read_text())["seed"] == 2


def test_two_phantoms_into_one_folder_at_once(tmp_path):
    """Two real processes, different seeds, one --out: one writes, the other is refused in one line."""
    import subprocess
    import sys

    out = tmp_path / "ph"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "respmotion.cli", "phantom", "--out", str(out), "--patients",
                               "2", "--shape", TINY, "--seed", str(seed)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for seed in (1, 2)]
    results = [(p.wait(timeout=1800), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    if codes == [0, 0]:  # the second started after the first finished: it must then have been refused... or equal
        pytest.fail(f"both runs succeeded into one folder: {results}")
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2).strip().splitlines()
    assert len(err) == 1 and re.search(r"another respmotion process is writing|another `respmotion phantom` run",
                                       err[0]), err
    winner = 1 if results[0][0] == 0 else 2
    seeds = {json.loads(p.read_text())["seed"] for p in out.glob("*/*/study.json")}
    assert seeds == {winner * 1000, winner * 1000 + 1}  # one anatomy family, the winner's


def test_phantom_refused_while_another_process_writes(cli, tmp_path):
    from respmotion.io.ownership import claim

    out = tmp_path / "ph"
    with claim(out, "phantom", {"patients": 1, "seed": 1, "shape": [4, 16, 16], "noise_hu": 10.0}):
        check(cli, Case(["phantom", "--out", out, "--patients", "1", "--shape", TINY, "--seed", "2"], str(out),
                        r"another respmotion process is writing"))
    assert tree(out) == {"owner.json": tree(out)["owner.json"]}


@pytest.fixture(scope="module")
def finished_run(cohort, tmp_path_factory) -> Path:
    from respmotion.cli import main

    run = tmp_path_factory.mktemp("train") / "run"
    assert main(["train", "autoencoder", "--kind", "image", "--data", str(cohort), "--run-dir", str(run),
                 "--device", "cpu", "--steps", "1", *TRAIN_OVERRIDES]) == 0
    assert (run / "model.pt").exists()
    return run


def test_fresh_train_into_finished_run_refused(cli, cohort, finished_run):
    before = tree(finished_run)
    check(cli, Case(["train", "autoencoder", "--kind", "image", "--data", cohort, "--run-dir", finished_run,
                     "--device", "cpu", "--steps", "2", *TRAIN_OVERRIDES], str(finished_run),
                    r"holds a training run already.*--resume"))
    assert tree(finished_run) == before


def test_second_training_of_one_run_dir_refused(cli, cohort, finished_run):
    from respmotion.training.checkpoint import own_run_dir

    before = tree(finished_run)
    with own_run_dir(finished_run, "autoencoder_image", resuming=True):  # training A holds the folder
        check(cli, Case(["train", "autoencoder", "--resume", finished_run, "--device", "cpu", "--steps", "3"],
                        str(finished_run), r"another respmotion process is writing"))
    assert tree(finished_run) == before


# ---------------------------------------------------------------------------- weak messages
def test_object_array_mask_names_the_file(cli, cohort, tmp_path):
    data = copy_cohort(cohort, tmp_path / "cohort")
    victim = study_of(data) / "masks" / "lung_00.npy"
    np.save(victim, np.array([{"not": "a mask"}] * 4, dtype=object), allow_pickle=True)
    out = tmp_path / "gifs"
    check(cli, Case(["render", "--data", data, "--out", out, "--views", "axial", "--contours", "lung"], "lung_00.npy",
                    r"object|not a readable", [out], allowed=("render_config.yaml",)))


@pytest.mark.parametrize("argv", [
    ["data", "import", "CT", "--out", "OUT/ct.npy", "colour=red"],
    ["synthesize", "CT", "--model", "gt", "--out", "OUT", "--no-render", "colour=red"],
    ["phantom", "--out", "OUT", "--shape", TINY, "colour=red"],
])
def test_overrides_after_flags_reach_the_config(cli, nifti_ct, tmp_path, argv):
    argv = [str(nifti_ct) if a == "CT" else a.replace("OUT", str(tmp_path / "out")) for a in argv]
    check(cli, Case(argv, "colour", r"unknown config key 'colour'", [tmp_path / "out"]))


def test_override_after_flags_applies(cli, nifti_ct, tmp_path):
    out = tmp_path / "ct.npy"
    rc, lines = cli(["data", "import", nifti_ct, "--out", out, "shape=3,12,12"])
    assert rc == 0, lines
    assert np.load(out).shape == (3, 12, 12)


# ---------------------------------------------------------------------------- small defects
def test_train_diffusion_split_uses_patient_folders(tmp_path):
    from respmotion.diffusion.train import DiffusionRunConfig, make_split

    for patient in ("p0", "p1", "p2"):
        for study in ("study_0", "study_1"):
            (tmp_path / patient / study).mkdir(parents=True)
            (tmp_path / patient / study / "latents.json").write_text("{}")
    cfg = DiffusionRunConfig()
    cfg.data.latents = str(tmp_path)
    split = make_split(cfg, {"dvf_autoencoder": {}})
    assert sorted([*split.train, *split.val, *split.test]) == ["p0", "p1", "p2"]


def test_help_override_examples_are_real_keys():
    from respmotion.cli import build_parser
    from respmotion.config import load_config
    from respmotion.training.autoencoder import AutoencoderRunConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["phantom"]
    text = next(a.help for a in sub._actions if a.dest == "overrides")
    examples = re.findall(r"(train\.[\w.]+=\S+?)(?=[ ,)]|$)", text)
    assert examples, text
    load_config(AutoencoderRunConfig, None, None, examples)  # raises on an unknown key


def test_render_patient_number_of_phantom_ids(cli, cohort, tmp_path):
    out = tmp_path / "gifs"
    rc, lines = cli(["render", "--data", cohort, "--out", out, "--patient", "0", "--views", "axial"])
    assert rc == 0, lines
    assert list((out / "phantom_000").rglob("*.gif"))


def test_image_autoencoder_logs_one_minus_ssim_not_ssim():
    from respmotion.training.autoencoder import AutoencoderRunConfig, AutoencoderTask, resolve
    from respmotion.training.splits import Split

    cfg = AutoencoderRunConfig()
    cfg.model.base_channels, cfg.model.norm_groups, cfg.model.channel_mults = 8, 4, (1, 2)
    cfg.image_loss.views = ["axial"]
    task = AutoencoderTask(resolve(cfg), Split(("p",), (), ()))
    terms = task.loss(task.build_model(), {"x": torch.zeros(1, 1, 8, 16, 16)}, 0)
    assert "one_minus_ssim" in terms and "ssim" not in terms


def test_latents_rerun_removes_orphan_tmp(cli, cohort, checkpoints, tmp_path):
    out = tmp_path / "latents"
    argv = ["latents", "--data", cohort, "--image-ae", checkpoints["image"], "--dvf-ae", checkpoints["dvf"],
            "--out", out, "--device", "cpu", "--fields", "gt_ref"]
    assert cli(argv)[0] == 0
    sdir = next(out.glob("*/*/latents.json")).parent
    (sdir / "latents.json").unlink()  # as if killed before the study's marker
    (sdir / ".tmp-dvf_ref_40-abc.npy").write_bytes(b"half")
    assert cli(argv)[0] == 0
    no_tmp(out)


def test_odd_patient_id_gives_no_pydicom_warnings(cli, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while the factory writes it too
        write_ct_series(tmp_path / "odd", ct_array(), patient_id="X" * 70)  # longer than VR LO allows
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rc, lines = cli(["data", "import", tmp_path / "odd", "--out", tmp_path / "ct.npy"])
    assert rc == 0, lines
    assert not [w for w in seen if "pydicom" in (w.filename or "")], [str(w.message) for w in seen][:3]


def test_examples_have_no_absolute_machine_paths():
    root = Path(__file__).resolve().parents[1] / "examples"
    for p in root.glob("*.py"):
        hits = re.findall(r"""["'](/(?:work|home|tmp|Users|mnt)/[^"']*)""", p.read_text())
        assert not hits, f"{p.name}: absolute machine path(s) {hits}"


def test_example_rtstruct_reads_on_its_ct():
    from respmotion.io.dicom_series import SeriesRef
    from respmotion.io.rtstruct import read_rtstruct

    data = Path(__file__).resolve().parents[1] / "examples" / "data"
    masks = read_rtstruct(data / "nodule_rtstruct.dcm", SeriesRef.from_folder(data / "ct" / "phase_00"))
    assert list(masks) == ["GTV"] and masks["GTV"].sum() > 0


# ============================================================================ inputs checked before writing
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def _trace(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _rtstruct(tmp_path: Path, how: str) -> Path:
    """The example RTSTRUCT cut to a third / with a NaN contour coordinate / without any ROI."""
    import warnings

    import pydicom

    src, out = EXAMPLES / "nodule_rtstruct.dcm", tmp_path / f"rtstruct_{how}.dcm"
    if how == "cut":
        data = src.read_bytes()
        out.write_bytes(data[: len(data) // 3])
        return out
    ds = pydicom.dcmread(src)
    if how == "nan":
        contour = ds.ROIContourSequence[0].ContourSequence[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the NaN it is asked to store
            contour.ContourData = ["NaN", *list(contour.ContourData)[1:]]
    else:
        del ds.ROIContourSequence, ds.StructureSetROISequence
    ds.save_as(out)
    return out


def _nifti_raw(tmp_path: Path, name: str, arr_zyx: np.ndarray, z_pixdim: float | None = None) -> Path:
    """A NIfTI file of ``arr_zyx``; ``z_pixdim`` overwrites the stored z voxel size (nibabel would fix it on save)."""
    import struct

    import nibabel as nib

    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr_zyx.transpose(2, 1, 0)).astype(np.float32), None), str(path))
    if z_pixdim is not None:
        raw = bytearray(path.read_bytes())
        raw[88:92] = struct.pack("<f", z_pixdim)  # pixdim[3] of the NIfTI-1 header
        path.write_bytes(bytes(raw))
    return path


BREATHS = "".join(f"{t * 0.5:g},{np.cos(np.pi * t / 4):.3f}\n" for t in range(24))
BEFORE_WRITING = {  # case -> (extra argv of `synthesize STUDY --model gt --out OUT --no-render`, names, problem)
    "samples_0": (["--samples", "0"], "--samples", r"must be >= 1"),
    "samples_negative": (["--samples", "-2"], "--samples", r"must be >= 1"),
    "threads_negative": (["--threads", "-2"], "--threads", r"must be >= 0"),
    "si_amplitude_0": (["--si-amplitude-mm", "0"], "--si-amplitude-mm", r"no motion"),
    "si_amplitude_huge": (["--si-amplitude-mm=1e9"], "--si-amplitude-mm", r"larger than any breathing"),
    "two_amplitudes": (["--si-amplitude-mm", "5", "--excursion-mm", "10"], "--si-amplitude-mm", r"give one"),
    "names_without_structures": (["--structure-names", "GTV"], "--structure-names", r"--structures"),
    "formats_empty": (["--formats", ","], "--formats", r"no format given"),
    "seed_without_folder": (["--model", "seed:"], "seed:", r"names no folder"),
    "trace_empty": (["--trace", ("empty.csv", "")], "empty.csv", r"at least 3 samples"),
    "trace_header_only": (["--trace", ("header.csv", "time,amplitude\n")], "header.csv", r"at least 3 samples"),
    "trace_one_row": (["--trace", ("one.csv", "0,1\n")], "one.csv", r"at least 3 samples"),
    "trace_nan": (["--trace", ("nan.csv", "0,1\n1,nan\n2,0\n")], "nan.csv", r"finite"),
    "trace_flat": (["--trace", ("flat.csv", "0,1\n1,1\n2,1\n3,1\n")], "flat.csv", r"no full breath"),
    "trace_time_back": (["--trace", ("back.csv", "0,1\n1,0\n0.5,1\n")], "back.csv", r"does not increase"),
    "trace_semicolons": (["--trace", ("semi.csv", "0;1\n1;0\n2;1\n")], "semi.csv", r"expected 'time, amplitude'"),
    "trace_binary": (["--trace", ("binary.csv", bytes(range(128, 256)) * 8)], "binary.csv", r"not a text CSV"),
    "trace_missing": (["--trace", "missing.csv"], "missing.csv", r"cannot read"),
    "trace_folder": (["--trace", "FOLDER"], "folder", r"cannot read.*directory"),
    "trace_too_long_for_disk": (["--trace", ("long.csv", BREATHS)], "long.csv", r"GiB .*free"),
    "rtstruct_cut": (["--structures", "RT:cut"], "rtstruct_cut.dcm", r"cut short|not a readable|no ROI"),
    "rtstruct_nan": (["--structures", "RT:nan"], "rtstruct_nan.dcm", r"NaN"),
    "rtstruct_no_roi": (["--structures", "RT:none"], "rtstruct_none.dcm", r"no ROI"),
    "ct_z_pixdim_0": (["CT:pixdim0"], "pixdim0.nii", r"pixdim.* z is 0"),
    "ct_not_hu": (["CT:huge"], "huge.nii", r"not Hounsfield"),
    "ct_is_a_mask": (["CT:mask"], "mask.nii", r"mask"),
    "ct_one_slice": (["CT:slice"], "slice.nii", r"not a 3D CT"),
}


@pytest.mark.parametrize("case", list(BEFORE_WRITING))
def test_inputs_checked_before_anything_is_written(cli, cohort, tmp_path, monkeypatch, case):
    """Bad settings, trace files, structure sets and CTs are refused in one line naming the flag or file
    before ``--out`` is touched (a refused run leaves no folder that looks finished)."""
    extra, names, problem = BEFORE_WRITING[case]
    ct: Path = study_of(cohort)
    model = ["--model", "gt"]
    argv = []
    for a in extra:
        if isinstance(a, tuple):
            argv.append(_trace(tmp_path, *a))
        elif a == "FOLDER":
            (tmp_path / "folder").mkdir()
            argv.append(tmp_path / "folder")
        elif a.startswith("RT:"):  # the example CT and its structure set, with the default motion model
            ct, model = EXAMPLES / "ct" / "phase_00", []
            argv.append(_rtstruct(tmp_path, a[3:]))
        elif a.startswith("CT:"):
            arr = ct_array(4).astype(np.float32)
            arr = {"pixdim0": arr, "huge": np.where(arr > 0, 1e30, arr), "mask": (arr > 0).astype(np.float32),
                   "slice": arr[:1]}[a[3:]]
            ct, model = _nifti_raw(tmp_path, f"{a[3:]}.nii", arr, 0.0 if a == "CT:pixdim0" else None), []
        else:
            argv.append(a)
    if case == "trace_too_long_for_disk":
        import shutil as sh

        monkeypatch.setattr("respmotion.synthesis.checks.shutil.disk_usage", lambda p: sh._ntuple_diskusage(1, 1, 0))
    out = tmp_path / "out"
    check(cli, Case(["synthesize", ct, *model, "--out", out, "--no-render", *argv], names, problem, [out]))
    assert not out.exists(), f"{case}: a refused run left {out}"


# ---------------------------------------------------------------------------- truncated files, every reader
def _registered_fields(cli, cohort: Path, tmp_path: Path) -> Path:
    cfg = tmp_path / "reg.yaml"
    cfg.write_text(REG_YAML)
    out = tmp_path / "reg"
    rc, lines = cli(["register", "--data", cohort, "--out", out, "--config", cfg])
    assert rc == 0, lines
    return out


@pytest.mark.parametrize("reader", ["latents_registration_npz", "latents_gt_npy", "synthesize_phase_npy",
                                    "register_pair_npz"])
def test_truncated_file_named_by_every_reader(cli, cohort, checkpoints, tmp_path, reader):
    """A file cut short is named ("cut short") by whatever reads it, before the reader writes anything,
    through the one archive helper (``io.atomic.read_npy`` / ``read_npz``)."""
    from respmotion.io.atomic import read_npz

    data = copy_cohort(cohort, tmp_path / "cohort")
    study = study_of(data)
    out = tmp_path / "out"
    latents = ["latents", "--data", data, "--image-ae", checkpoints["image"], "--dvf-ae", checkpoints["dvf"],
               "--out", out, "--device", "cpu"]
    if reader in ("latents_registration_npz", "register_pair_npz"):
        reg = _registered_fields(cli, data, tmp_path)
        victim = next(reg.glob("*/*/ref_50.npz"))
        victim.write_bytes(victim.read_bytes()[:100])
        if reader == "register_pair_npz":  # the library reader the rerun relies on
            with pytest.raises(ValueError, match=r"ref_50\.npz: not a readable \.npz archive \(cut short"):
                read_npz(victim)
            return
        argv = [*latents, "--fields", f"reg_ref@{reg}"]
    elif reader == "latents_gt_npy":
        victim = study / "gt" / "dvf_ref_50.npy"
        victim.write_bytes(victim.read_bytes()[:300])
        argv = latents
    else:
        victim = study / "phase_00.npy"
        victim.write_bytes(victim.read_bytes()[:300])
        argv = ["synthesize", study, "--model", "gt", "--out", out, "--no-render"]
    check(cli, Case(argv, victim.name, r"cut short", [out]))
    assert not out.exists()


# ---------------------------------------------------------------------------- one rank validator
@pytest.mark.parametrize("command", ["register", "latents", "train"])
@pytest.mark.parametrize("bad", ["world_size_flag", "rank_env"])
def test_ranks_validated_the_same_way_in_every_sharded_command(cli, cohort, checkpoints, tmp_path, monkeypatch,
                                                               command, bad):
    """``--world-size -1`` and ``RANK=abc`` are refused by every sharded command in one line naming the flag
    or variable, before the output folder is made (``runtime.resolve_rank``)."""
    out = tmp_path / "out"
    argv = {"register": ["register", "--data", cohort, "--out", out],
            "latents": ["latents", "--data", cohort, "--image-ae", checkpoints["image"], "--dvf-ae",
                        checkpoints["dvf"], "--out", out, "--device", "cpu"],
            "train": _argv("train", out, cohort, cohort)}[command]
    if bad == "rank_env":
        monkeypatch.setenv("RANK", "abc")
        check(cli, Case(argv, "RANK", r"not an integer", [out]))
    elif command == "train":  # torchrun's variables are train's only shard settings
        monkeypatch.setenv("WORLD_SIZE", "-1")
        check(cli, Case(argv, "WORLD_SIZE", r"must be >= 1", [out]))
    else:
        check(cli, Case([*argv, "--world-size", "-1"], "--world-size", r"must be >= 1", [out]))
    assert not out.exists()
