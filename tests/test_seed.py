"""Research-code (seed) checkpoints: published layout, exact loading, units, composed cycle, CLI.

No research code and no network here: models are written in the published layout with random
weights by our own writer.  (Equivalence with the research source itself is checked outside the
suite, see the issue note.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from respmotion.cli import main
from respmotion.core import warp as W
from respmotion.core.geometry import Geometry
from respmotion.core.types import Volume
from respmotion.models.seed import (AutoencoderArgs, SeedAutoencoder, SeedUNet, SeedVariationalAutoencoder, UNetArgs,
                                    clean_keys, load_seed_checkpoints, randomize_, write_seed_checkpoints)
from respmotion.models.seed.loader import DVF_AE, IMAGE_AE, LDM
from respmotion.synthesis.seed import SeedMotion, airlab_to_pull_mm, load_seed_motion, model_input, normalize_hu

TINY_IMAGE = AutoencoderArgs(in_channels=1, base_channels=8, latent_channels=3, out_channels=1, layer_type="double_res",
                             keep_z=[True, True], channel_multipliers=[1, 2], norm="group")
TINY_DVF = AutoencoderArgs(variational=True, in_channels=3, base_channels=8, latent_channels=9, out_channels=3,
                           layer_type="double_res", keep_z=[True, True], channel_multipliers=[1, 2], norm="group",
                           dvf_scale_factor=10.0)
TINY_UNET = UNetArgs(image_width=4, image_depth=4, in_channels=12, out_channels=9, base_channels=8, n_layers=2,
                     layer_type="double_res", keep_z=[False, True], noise_schedule="linear", norm="group",
                     dvf_scale_factor=10.0)
TINY_SHAPE = (4, 16, 16)  # image grid of the tiny models (latent 4x4x4)


def write_tiny(root, seed: int = 0):
    nets = (randomize_(SeedAutoencoder(TINY_IMAGE), seed), randomize_(SeedVariationalAutoencoder(TINY_DVF), seed + 1),
            randomize_(SeedUNet(TINY_UNET), seed + 2))
    write_seed_checkpoints(root, nets[0], TINY_IMAGE, nets[1], TINY_DVF, nets[2], TINY_UNET, {"T": 1000})
    return nets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    return root, write_tiny(root)


def test_published_layout_round_trip(tiny):
    root, (img, dvf, unet) = tiny
    for rel in (IMAGE_AE, DVF_AE, LDM):
        assert (root / rel).is_file() and (root / rel.parent / "args.json").is_file()
        assert set(json.loads((root / rel.parent / "args.json").read_text())) == {"model_args", "train_args"}
    m = load_seed_checkpoints(root)
    for ours, ref in ((m.image_autoencoder, img), (m.dvf_autoencoder, dvf), (m.unet, unet)):
        a, b = ours.state_dict(), ref.state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    gn = m.unet.encs[0].downform[1].norm1
    assert isinstance(gn, torch.nn.GroupNorm) and gn.num_groups == 2  # 16 channels // 8
    assert not torch.allclose(gn.weight, torch.ones_like(gn.weight))  # non-trivial affine survived
    g = torch.Generator().manual_seed(0)
    x = torch.rand((1, 1) + TINY_SHAPE, generator=g) * 2 - 1
    z = m.image_encoder(x)
    assert z.shape == (1, 3, 4, 4, 4)
    assert torch.equal(z, img.eval().encode(x))
    d = m.dvf_decoder(torch.randn((1, 9, 4, 4, 4), generator=g))
    assert d.shape == (1, 3) + TINY_SHAPE
    eps = m.unet(torch.randn((2, 12, 4, 4, 4), generator=g), torch.tensor([0.5, 0.01]), torch.tensor([0, 8]))
    assert eps.shape == (2, 9, 4, 4, 4)
    assert m.dvf_scale_factor == 10.0 and set(m.provenance["sha256"]) == {str(r) for r in (IMAGE_AE, DVF_AE, LDM)}


def test_prefixed_keys_are_cleaned(tmp_path, tiny):
    root, (_, _, unet) = tiny
    assert clean_keys({"_orig_mod.module.input.weight": 1, "module.out.bias": 2}) == {"input.weight": 1, "out.bias": 2}
    other = tmp_path / "w"
    write_tiny(other)
    torch.save({"_orig_mod.module." + k: v for k, v in unet.state_dict().items()}, other / LDM)
    m = load_seed_checkpoints(other)
    assert all(torch.equal(m.unet.state_dict()[k], v) for k, v in unet.state_dict().items())


def test_mismatched_checkpoint_is_one_clear_error(tmp_path):
    root = tmp_path / "w"
    write_tiny(root)
    doc = json.loads((root / "ldm" / "args.json").read_text())
    doc["model_args"]["base_channels"] = 16
    (root / "ldm" / "args.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"ldm\.pt: .* has shape"):
        load_seed_checkpoints(root)
    (root / "dvf_vae" / "args.json").unlink()
    with pytest.raises(FileNotFoundError, match="args.json"):
        load_seed_checkpoints(root)


def test_published_architecture_keys_and_shapes():
    """Keys/shapes of the research networks with the published argument templates (read from its source)."""
    img = AutoencoderArgs(in_channels=1, base_channels=96, latent_channels=3, out_channels=1, layer_type="double_res",
                          keep_z=[True, True, True], channel_multipliers=[1, 2, 4], norm="group", dvf_scale_factor=10.0)
    unet_args = UNetArgs(image_width=32, image_depth=50, in_channels=12, out_channels=9, base_channels=64, n_layers=3,
                         layer_type="double_res", keep_z=[False, True, True], noise_schedule="linear", norm="group",
                         dvf_scale_factor=10.0)
    with torch.device("meta"):
        ae = SeedAutoencoder(img).state_dict()
        unet = SeedUNet(unet_args).state_dict()
    expect_ae = {"encoder.input.weight": (96, 1, 1, 1, 1), "encoder.encs.0.downform.1.conv1.weight": (96, 96, 1, 3, 3),
                 "encoder.encs.2.downform.1.residual.weight": (384, 192, 1, 3, 3),
                 "encoder.out.0.conv1.weight": (384, 384, 1, 3, 3), "encoder.out.1.weight": (3, 384, 1, 1, 1),
                 "decoder.start.0.weight": (384, 3, 1, 1, 1), "decoder.decs.0.upform.0.weight": (384, 192, 1, 2, 2),
                 "decoder.decs.2.upform.1.norm2.bias": (96,), "decoder.out.weight": (1, 96, 1, 1, 1)}
    expect_unet = {"t_embs.0.0.weight": (256, 1), "t_embs.2.0.bias": (64,), "phase_embs.0.weight": (9, 256),
                   "phase_embs.2.weight": (9, 64), "input.weight": (64, 12, 1, 1, 1),
                   "encs.0.downform.1.conv1.weight": (128, 64, 3, 3, 3),
                   "encs.1.downform.1.conv2.weight": (256, 256, 1, 3, 3),
                   "bottleneck.downform.1.residual.weight": (512, 256, 1, 3, 3),
                   "decs.0.upform.weight": (512, 256, 1, 2, 2), "decs.0.conv.conv1.weight": (256, 512, 1, 3, 3),
                   "decs.2.upform.weight": (128, 64, 2, 2, 2), "decs.2.conv.norm1.weight": (64,),
                   "out.weight": (9, 64, 1, 1, 1)}
    for sd, expect in ((ae, expect_ae), (unet, expect_unet)):
        for k, shape in expect.items():
            assert tuple(sd[k].shape) == shape, k
    assert not any("residual" in k for k in ae if k.startswith("decoder.start"))  # 384 -> 384 keeps identity


def test_input_normalisation_and_grid():
    hu = np.array([[[-3000.0, -1024.0, 1023.5, 3071.0, 5000.0]]])
    assert np.allclose(normalize_hu(hu), [[[-1, -1, 0, 1, 1]]], atol=1e-6)
    ct = Volume(np.full((6, 8, 10), 1023.5, np.float32), Geometry((6, 8, 10), (2.5, 0.9, 0.9)))
    ct.array[0] = -3000.0
    x = model_input(ct, (3, 4, 5))
    ref = F.interpolate(torch.from_numpy(normalize_hu(ct.array))[None, None], size=(3, 4, 5), mode="trilinear",
                        align_corners=False)
    assert x.shape == (1, 1, 3, 4, 5) and torch.allclose(x, ref)  # clip first, then resample (research order)


def _translation_airlab(shape, spacing, t_mm):
    """Airlab field (x, y, z channels, normalised) that pulls by ``t_mm`` (z, y, x) everywhere."""
    d = torch.zeros((1, 3) + tuple(shape), dtype=torch.float64)
    for axis in range(3):
        n = shape[axis]
        i = torch.arange(n, dtype=torch.float64)
        g = torch.linspace(-1, 1, n, dtype=torch.float64)
        target = i + t_mm[axis] / spacing[axis]  # pulled voxel position
        comp = (2 * target + 1) / n - 1 - g  # grid_sample(align_corners=False) coordinate minus airlab's grid
        view = [1, 1, 1]
        view[axis] = n
        d[0, 2 - axis] = comp.reshape(view).expand(shape)
    return d


def test_airlab_units_to_mm_known_translation():
    shape, spacing, t = (5, 7, 9), (3.0, 1.5, 0.8), (2.4, -1.1, 0.7)
    u = airlab_to_pull_mm(_translation_airlab(shape, spacing, t), spacing)
    for axis in range(3):
        assert torch.allclose(u[0, axis], torch.full(shape, t[axis], dtype=torch.float64), atol=1e-9)
    # airlab's zero field is not the identity under grid_sample(align_corners=False): +-0.5 voxel at the edges
    u0 = airlab_to_pull_mm(torch.zeros((1, 3) + shape, dtype=torch.float64), spacing)
    assert u0[0, 2, 0, 0, 0] == pytest.approx(-0.5 * 0.8) and u0[0, 2, 0, 0, -1] == pytest.approx(0.5 * 0.8)
    assert u0[0, 0, 2, 3, 4] == pytest.approx(0.0)  # centre


def test_airlab_units_warp_like_grid_sample():
    """Our warp with the converted field == the research warp (grid_sample of grid + d, align_corners=False)."""
    g = torch.Generator().manual_seed(1)
    shape, spacing = (6, 10, 12), (2.0, 1.2, 0.7)
    img = F.avg_pool3d(torch.rand((1, 1) + shape, generator=g), 3, 1, 1)
    d = 0.03 * torch.randn((1, 3, 3, 4, 4), generator=g)
    d = F.interpolate(d, size=shape, mode="trilinear", align_corners=True)
    zz, yy, xx = (torch.linspace(-1, 1, n) for n in shape)
    grid = torch.stack(torch.meshgrid(xx, yy, zz, indexing="ij"), -1).permute(2, 1, 0, 3)[None]  # (1,Z,Y,X,(x,y,z))
    ref = F.grid_sample(img, grid + d.permute(0, 2, 3, 4, 1), mode="bilinear", padding_mode="border",
                        align_corners=False)
    ours = W.warp(img, airlab_to_pull_mm(d, spacing), spacing)
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    assert torch.allclose(ours[inside], ref[inside], atol=1e-5)


def test_seed_schedule_and_ddim_timesteps(tiny):
    root, _ = tiny
    motion = load_seed_motion(root)
    research_betas = torch.linspace(1e-4, 0.02, 1001, dtype=torch.float64)[:1000]
    assert torch.allclose(motion.schedule.betas, research_betas, rtol=1e-6, atol=1e-10)
    assert [t + 1 for t in motion.sampler.timesteps] == list(range(1000, 0, -5))  # research DDIM loop, 200 steps
    assert motion.shape == TINY_SHAPE
    d = motion.describe()
    assert d["kind"] == "seed" and d["steps"] == 200 and d["delta_t"] == 5 and len(d["sha256"]) == 3
    assert load_seed_motion(root, sampler="dpm", steps=7).sampler.num_steps == 7
    assert load_seed_motion(root, sampler="dpm").sampler.num_steps == 20
    assert load_seed_motion(root, sampler="ddpm").sampler.num_steps == 1000
    with pytest.raises(ValueError, match="delta"):
        load_seed_motion(root, delta_t=7)
    assert load_seed_motion(root, delta_t=50).sampler.num_steps == 20
    # research DDIM step with its alpha-bar index fixed (ps_alpha[t_next - 1]) == our DDIM step
    sched, sampler = motion.schedule, motion.sampler
    g = torch.Generator().manual_seed(3)
    x, eps = (torch.randn(2, 9, 4, 4, 4, dtype=torch.float64, generator=g) for _ in range(2))
    ab = torch.cumprod(1 - research_betas, 0)
    t = 1000
    a, an = ab[t - 1], ab[t - 5 - 1]
    research = torch.sqrt(an / a) * x + (torch.sqrt(1 - an) - torch.sqrt((1 - a) * an / a)) * eps
    assert torch.allclose(sampler.step(0, eps, x, lambda: None), research, rtol=1e-5, atol=1e-5)
    assert sched.T == 1000


class _ScalingSteps(SeedMotion):
    """Transitions replaced by a known step: z-scaling about the centre by ``a`` per transition."""

    a = 0.02

    def transition(self, image, phase, x_T, gen):
        self.seen.append(image.clone())
        zs = torch.arange(self.shape[0], dtype=torch.float64)
        c = (self.shape[0] - 1) / 2
        spacing = self.spacing
        step = torch.zeros((image.shape[0], 3) + self.shape, dtype=torch.float64)
        step[:, 0] = (self.a * (zs - c) * spacing[0]).reshape(-1, 1, 1)
        return _to_airlab(step, spacing).to(image.dtype)


def _to_airlab(u_mm, spacing):
    """Inverse of airlab_to_pull_mm (for the stub)."""
    d = torch.zeros_like(u_mm)
    shape = u_mm.shape[2:]
    for axis in range(3):
        n = shape[axis]
        view = [1, 1, 1, 1]
        view[1 + axis] = n
        i = torch.arange(n, dtype=u_mm.dtype).reshape(view)
        g = torch.linspace(-1, 1, n, dtype=u_mm.dtype).reshape(view)
        d[:, 2 - axis] = (2 * (i + u_mm[:, axis] / spacing[axis]) + 1) / n - 1 - g
    return d


def test_composed_cycle(tiny):
    """u_{p+1} = compose(u_p, step_p) (a product of scalings, not a sum), conditioned on the warped 00 % image."""
    root, _ = tiny
    m = _ScalingSteps(load_seed_checkpoints(root), shape=(24, 16, 16))
    m.seen = []
    ct = Volume(np.random.default_rng(0).uniform(-1000, 500, (24, 16, 16)).astype(np.float32),
                Geometry((24, 16, 16), (2.5, 1.0, 1.0)))
    m.spacing = ct.geometry.spacing
    cyc = m.generate(ct, samples=1, seed=0)[0]
    assert sorted(cyc) == list(range(0, 100, 10)) and not cyc[0].array.any()
    zs = np.arange(24) - 11.5
    inner = np.abs(zs) <= 6  # every position the composition samples stays well inside the grid
    for k in range(1, 10):
        u = cyc[10 * k].array
        expect = ((1 + m.a) ** k - 1) * zs * 2.5  # composition of k scalings
        assert np.allclose(u[0][inner, 4, 4], expect[inner], atol=1e-3)
        assert np.abs(u[1:]).max() < 1e-4
    summed = 9 * m.a * zs * 2.5
    assert not np.allclose(cyc[90].array[0][:, 4, 4][np.abs(zs) < 2], summed[np.abs(zs) < 2], atol=1e-2)
    img0 = model_input(ct, m.shape)
    for k, seen in enumerate(m.seen):  # transition k sees the 00 % image warped by u_k
        u = torch.from_numpy(cyc[10 * k].array)[None]
        assert torch.allclose(seen, W.warp(img0, u, ct.geometry.spacing), atol=1e-5)


def test_seed_motion_generates_deterministic_cycles(tiny):
    root, _ = tiny
    motion = load_seed_motion(root, sampler="dpm", steps=2)
    ct = Volume(np.random.default_rng(1).uniform(-1000, 500, (8, 20, 20)).astype(np.float32),
                Geometry((8, 20, 20), (3.0, 1.0, 1.0)))
    a = motion.generate(ct, samples=2, seed=5)
    b = motion.generate(ct, samples=2, seed=5)
    assert len(a) == 2 and a[0][90].geometry.same_as(ct.geometry.resized(TINY_SHAPE))
    assert np.array_equal(a[1][50].array, b[1][50].array)
    assert not np.array_equal(a[0][50].array, a[1][50].array)


def test_synthesize_cli_with_seed_model(tmp_path, tiny):
    from respmotion.io.volumes import save_volume

    root, _ = tiny
    ct = Volume(np.random.default_rng(2).uniform(-1000, 500, (6, 20, 18)).astype(np.float32),
                Geometry((6, 20, 18), (3.0, 1.1, 1.2), (-10.0, 5.0, 30.0)))
    save_volume(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    rc = main(["synthesize", str(tmp_path / "ct.nii.gz"), "--model", f"seed:{root}", "--out", str(out),
               "--sampler", "dpm", "--steps", "2", "--no-render"])
    assert rc == 0
    s = out / "sample_00"
    for k in range(0, 100, 10):
        assert (s / f"phase_{k:02d}.nii.gz").is_file() and (s / f"dvf_{k:02d}.nii.gz").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_shape"] == list(TINY_SHAPE)
    assert summary["samples"][0]["phases"]["00"]["max_mm"] == 0.0
    assert summary["samples"][0]["phases"]["90"]["max_mm"] > 0.0


def test_synthesize_cli_bad_seed_dir(tmp_path, capsys):
    from respmotion.io.volumes import save_volume

    hu = np.random.default_rng(0).uniform(-1000, 200, (4, 8, 8)).astype(np.float32)  # a CT, so only --model is wrong
    ct = Volume(hu, Geometry((4, 8, 8), (3.0, 1.0, 1.0)))
    save_volume(ct, tmp_path / "ct.nii.gz")
    rc = main(["synthesize", str(tmp_path / "ct.nii.gz"), "--model", f"seed:{tmp_path / 'nope'}", "--out",
               str(tmp_path / "o"), "--no-render"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_bench_seed_record(tiny):
    """bench.seed's record on the tiny seed model and a small phantom (shape only; no timing asserted)."""
    from bench import seed as bench_seed  # the repository root is on sys.path under `python -m pytest`

    root, _ = tiny
    rec = bench_seed.run("cpu", weights=str(root), diff=True, shape=(16, 64, 64))
    assert rec["method"] == "composed" and rec["model_shape"] == list(TINY_SHAPE)
    assert rec["samplers"]["ddim_200"]["steps"] == 200 and rec["samplers"]["dpmpp2m_20"]["steps"] == 20
    d = rec["field_difference_step_00_10"]
    assert d["mean_mm"] >= 0 and d["max_mm"] >= d["mean_mm"]



def test_synthesis_hands_seed_models_the_native_ct(tmp_path, tiny, monkeypatch):
    """The research preprocessing (trilinear, no anti-aliasing) must see the native CT, not our resampled one."""
    from respmotion.synthesis import pipeline as P

    root, _ = tiny
    motion = load_seed_motion(root, sampler="dpm", steps=2)
    seen = []
    real = motion.generate
    monkeypatch.setattr(motion, "generate",
                        lambda ct, samples, seed: seen.append(ct.geometry.shape) or real(ct, samples, seed))
    ct = Volume(np.random.default_rng(2).uniform(-1000, 500, (8, 20, 20)).astype(np.float32),
                Geometry((8, 20, 20), (3.0, 1.0, 1.0)))
    P.synthesize(ct, motion, tmp_path / "out", P.SynthesisOptions(samples=1, seed=0))
    assert seen == [ct.geometry.shape] and ct.geometry.shape != tuple(motion.shape)
