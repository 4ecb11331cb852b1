"""The latent set: mirror tree, provenance, sharding, resume after interruption, dataset items, CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from respmotion.diffusion.latents import (
    PROVENANCE,
    STUDY_MARKER,
    LatentDataset,
    build_latent_set,
    channel_stats,
    read_provenance,
    resolve_rank,
    shard,
)
from respmotion.io.layout import iter_studies
from respmotion.models.autoencoder import Autoencoder, default_net_config
from respmotion.io.checkpoint import save_checkpoint

SHAPE = (8, 16, 16)


def _save_ae(path, kind: str, seed: int, scale: float = 1.0):
    torch.manual_seed(seed)
    m = Autoencoder(default_net_config(kind, base_channels=8, norm_groups=8, dropout=0.0))
    m.latent_scale.fill_(scale)
    save_checkpoint({"task": f"autoencoder_{kind}", "step": 7, "model": m.state_dict(),
                     "model_config": m.cfg.to_dict(), "extra": {"split": {"train": ["phantom_000"], "val": [],
                                                                          "test": ["phantom_002"]}}}, path)
    return m.eval()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from respmotion.data.phantom import write_cohort

    tmp = tmp_path_factory.mktemp("latents")
    write_cohort(tmp / "cohort", 3, seed=5, shape=SHAPE)
    img = _save_ae(tmp / "image.pt", "image", 0, scale=0.5)
    dvf = _save_ae(tmp / "dvf.pt", "dvf", 1, scale=2.0)
    return {"tmp": tmp, "root": tmp / "cohort", "image_ae": img, "dvf_ae": dvf}


def _build(c, out, **kw):
    return build_latent_set(c["root"], out, c["tmp"] / "image.pt", c["tmp"] / "dvf.pt", device="cpu", **kw)


def test_mirror_tree_provenance_and_values(cohort):
    out = cohort["tmp"] / "set"
    summary = _build(cohort, out)
    assert summary["encoded"] == 3 and summary["files_written"] == 3 * (1 + 9 + 10)
    prov = read_provenance(out)
    assert prov["image_autoencoder"]["latent_scale"] == 0.5 and prov["dvf_autoencoder"]["latent_scale"] == 2.0
    assert len(prov["dvf_autoencoder"]["sha256"]) == 64 and prov["fields"] == ["gt_ref", "gt_step"]
    assert prov["dvf_autoencoder"]["split"]["test"] == ["phantom_002"]
    study = next(iter_studies(cohort["root"]))
    sdir = out / study.patient / study.study
    marker = json.loads((sdir / STUDY_MARKER).read_text())
    assert marker["files"]["image_00.npy"] == [3, 8, 2, 2] and marker["files"]["dvf_ref_40.npy"] == [9, 8, 2, 2]
    with torch.no_grad():
        want_img = cohort["image_ae"].encode_latent(torch.from_numpy(study.load_phase(0).array)[None, None])[0]
        want_dvf = cohort["dvf_ae"].encode_latent(torch.from_numpy(study.load_gt("step", 30).array)[None])[0]
    assert np.allclose(np.load(sdir / "image_00.npy"), want_img.numpy(), atol=1e-5)
    assert np.allclose(np.load(sdir / "dvf_step_30.npy"), want_dvf.numpy(), atol=1e-5)
    # rerun: nothing to do
    again = _build(cohort, out)
    assert again["encoded"] == 0 and again["skipped"] == 3 and again["files_written"] == 0


def test_shards_are_disjoint_and_complete_and_resume(cohort, monkeypatch):
    out = cohort["tmp"] / "sharded"
    a = _build(cohort, out, rank=0, world_size=2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    b = _build(cohort, out)  # rank from torchrun's environment
    assert (a["studies"], b["studies"]) == (2, 1) and b["rank"] == 1
    markers = sorted(out.glob(f"*/*/{STUDY_MARKER}"))
    assert len(markers) == 3
    # simulate a kill mid-study: marker and two latents gone, a stray temporary file left behind
    sdir = markers[1].parent
    markers[1].unlink()
    (sdir / "dvf_ref_20.npy").unlink()
    (sdir / "image_00.npy").unlink()
    (sdir / ".tmp-dvf_ref_30-abc.npy").write_bytes(b"half")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    c = _build(cohort, out)
    assert c["encoded"] == 1 and c["skipped"] == 2 and c["files_written"] == 2
    assert (sdir / STUDY_MARKER).exists() and (sdir / "dvf_ref_20.npy").exists()


def test_other_autoencoders_are_refused(cohort):
    out = cohort["tmp"] / "set_refuse"
    _build(cohort, out, fields=("gt_ref",))
    _save_ae(cohort["tmp"] / "dvf_other.pt", "dvf", 9)
    with pytest.raises(ValueError, match="other autoencoders"):
        build_latent_set(cohort["root"], out, cohort["tmp"] / "image.pt", cohort["tmp"] / "dvf_other.pt",
                         fields=("gt_ref",), device="cpu")
    with pytest.raises(ValueError, match="expected an image and a DVF"):
        build_latent_set(cohort["root"], cohort["tmp"] / "x", cohort["tmp"] / "dvf.pt", cohort["tmp"] / "dvf.pt")


def test_dataset_items_by_target(cohort):
    out = cohort["tmp"] / "set"
    if not (out / PROVENANCE).exists():
        _build(cohort, out)
    ref = LatentDataset(out, None, "ref")
    step = LatentDataset(out, ["phantom_000", "phantom_001"], "step")
    assert len(ref) == 3 * 9 and len(step) == 2 * 10
    phases = sorted(int(ref[i]["phase"]) for i in range(9))
    assert phases == list(range(1, 10))  # ref: 10 %..90 % (00 is the identity)
    item = step[0]
    assert item["x"].shape == (9, 8, 2, 2) and item["image"].shape == (3, 8, 2, 2) and int(item["phase"]) == 0
    assert item["key"].endswith("dvf_step_00")
    mean, std = channel_stats(ref, "x")
    assert mean.shape == (9,) and bool((std > 0).all())


def test_rank_resolution(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank() == (0, 1) and resolve_rank(2, 3) == (2, 3)
    with pytest.raises(ValueError, match="outside"):
        resolve_rank(3, 3)
    assert shard(list(range(7)), 1, 3) == [1, 4]


def test_cli_latents(cohort, capsys):
    from respmotion.commands import latents as cmd
    from respmotion.commands._common import run_command

    parser = argparse.ArgumentParser(prog="respmotion")
    cmd.register(parser.add_subparsers(dest="command"))
    out = cohort["tmp"] / "cli"
    args = parser.parse_args(["latents", "--data", str(cohort["root"]), "--image-ae", str(cohort["tmp"] / "image.pt"),
                              "--dvf-ae", str(cohort["tmp"] / "dvf.pt"), "--out", str(out), "--fields", "gt_ref",
                              "--device", "cpu", "--world-size", "3", "--rank", "2"])
    assert run_command(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["studies"] == 1 and summary["files_written"] == 10
    assert (out / "latents_config.rank2.yaml").exists()
    bad = parser.parse_args(["latents", "--data", str(cohort["root"]), "--out", str(out)])
    assert run_command(bad) == 2


TINY_UNET = ["model.unet.channels=[8,16,16]", "model.unet.attention_levels=[false,false,false]",
             "model.unet.norm_num_groups=8", "model.unet.num_head_channels=8", "model.unet.num_res_blocks=1",
             "train.batch_size=2", "train.grad_accum=2", "train.warmup_steps=1", "train.num_workers=0",
             "train.val_every=0", "train.log_every=1000", "train.image_every=0", "train.ckpt_every=2",
             "train.keep_checkpoints=0", "ema_decay=0.9"]


def test_train_diffusion_cli_resume_is_exact(cohort, monkeypatch):
    """`respmotion train diffusion` 4 steps == its step-2 checkpoint resumed to 4 (weights and EMA)."""
    import shutil

    from respmotion.commands import train as train_cmd
    from respmotion.commands._common import run_command
    from respmotion.io.checkpoint import load_checkpoint

    out = cohort["tmp"] / "set"
    if not (out / PROVENANCE).exists():
        _build(cohort, out)
    monkeypatch.setattr(train_cmd, "TRAIN_TARGET_MODULES", ("train_diffusion",))
    parser = argparse.ArgumentParser(prog="respmotion")
    train_cmd.register(parser.add_subparsers(dest="command"))
    runs = cohort["tmp"] / "runs"
    args = ["train", "diffusion", "--latents", str(out), "--device", "cpu", "--target", "step",
            "--run-dir", str(runs / "a"), "--steps", "4", *TINY_UNET]
    assert run_command(parser.parse_args(args)) == 0
    (runs / "b").mkdir()
    for name in ("00000002.pt", "config.yaml", "split.json"):  # the run as it was when killed after step 2
        shutil.copy(runs / "a" / name, runs / "b" / name)
    assert run_command(parser.parse_args(["train", "diffusion", "--resume", str(runs / "b")])) == 0
    a, b = load_checkpoint(runs / "a" / "model.pt"), load_checkpoint(runs / "b" / "model.pt")
    assert a["step"] == b["step"] == 4 and a["extra"]["target"] == "step"
    assert int(a["model"]["ema_updates"]) == 4
    assert not torch.equal(a["model"]["ema.net.conv_in.conv.weight"], a["model"]["unet.net.conv_in.conv.weight"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["extra"]["split"]["test"] == ["phantom_002"]  # the autoencoders' split is reused


def test_moved_run_tree_still_synthesizes(cohort, tmp_path, capsys):
    """A run tree (both autoencoders, the DVF VAE's motion prior, the diffusion bundle) copied elsewhere and
    the original removed: the bundle finds every recorded file beside itself (relpath, sha256 checked)."""
    import shutil

    from respmotion.cli import main
    from respmotion.io.checkpoint import load_checkpoint
    from respmotion.models.prior import MotionPrior
    from respmotion.training.data import FieldDataset, GroundTruthFields
    from respmotion.training.splits import studies_of

    tree = tmp_path / "tree"
    runs = tree / "runs"
    ds = FieldDataset(studies_of(cohort["root"], ["phantom_000"]), GroundTruthFields("ref"))
    prior = MotionPrior.from_fields((ds.raw(i) for i in range(len(ds))), {"patients": ["phantom_000"]})
    prior.save(runs / "autoencoder_dvf")
    for kind, seed in (("image", 0), ("dvf", 1)):
        torch.manual_seed(seed)
        m = Autoencoder(default_net_config(kind, base_channels=8, norm_groups=8, dropout=0.0))
        extra = {"split": {"train": ["phantom_000", "phantom_001"], "val": [], "test": ["phantom_002"]}}
        if kind == "dvf":
            extra["motion_prior"] = prior.record()
        save_checkpoint({"task": f"autoencoder_{kind}", "step": 1, "model": m.state_dict(),
                         "model_config": m.cfg.to_dict(), "extra": extra}, runs / f"autoencoder_{kind}" / "model.pt")
    build_latent_set(cohort["root"], tree / "latents", runs / "autoencoder_image" / "model.pt",
                     runs / "autoencoder_dvf" / "model.pt", fields=("gt_ref",), device="cpu")
    assert main(["train", "diffusion", "--latents", str(tree / "latents"), "--device", "cpu", "--steps", "1",
                 "--run-dir", str(runs / "diffusion"), *TINY_UNET]) == 0
    extra = load_checkpoint(runs / "diffusion" / "model.pt")["extra"]
    recorded = extra["latent_provenance"]
    assert recorded["dvf_autoencoder"]["relpath"] == "../autoencoder_dvf/model.pt"
    assert (extra["sampler"]["name"], extra["sampler"]["steps"]) == ("dpmpp2m", 15)  # DEFAULT_SAMPLER is recorded
    # --sampler on the train command follows synthesize's rule: another sampler starts from its own defaults
    assert main(["train", "diffusion", "--latents", str(tree / "latents"), "--device", "cpu", "--steps", "1",
                 "--run-dir", str(runs / "diffusion_ddim"), "--sampler", "ddim", *TINY_UNET]) == 0
    ddim = load_checkpoint(runs / "diffusion_ddim" / "model.pt")["extra"]["sampler"]
    assert (ddim["name"], ddim["steps"], ddim["delta_t"]) == ("ddim", 0, 5)  # the research code's 200 steps

    moved = tmp_path / "elsewhere" / "tree"
    shutil.copytree(tree, moved)
    shutil.rmtree(tree)
    ct = studies_of(cohort["root"], ["phantom_002"])[0].path
    out = tmp_path / "synth"
    capsys.readouterr()
    rc = main(["synthesize", str(ct), "--model", str(moved / "runs" / "diffusion"), "--out", str(out), "--no-render",
               "--device", "cpu", "--steps", "2"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["motion"]["steps"] == 2

    # a file beside the bundle that is not the recorded one (other sha256) is refused, naming it
    np.save(moved / "runs" / "autoencoder_dvf" / "motion_prior.npy", prior.fields + 1.0)
    capsys.readouterr()
    assert main(["synthesize", str(ct), "--model", str(moved / "runs" / "diffusion"), "--out", str(tmp_path / "o2"),
                 "--no-render", "--device", "cpu", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "motion_prior.npy" in err[0] and "sha256" in err[0], err
