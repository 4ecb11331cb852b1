"""Autoencoders: shapes and units, losses, patient split, and the acceptance runs on a tiny phantom
cohort (image AE and DVF VAE each beat predicting the mean of the training set)."""

import json

import numpy as np
import pytest
import torch

from respmotion.cli import main as cli_main
from respmotion.core.warp import upsample_field
from respmotion.models.autoencoder import (
    COARSE_LEVELS_DVF,
    Autoencoder,
    AutoencoderNetConfig,
    build_autoencoder,
    default_net_config,
    kl_divergence,
    load_autoencoder,
)
from respmotion.models.losses import DVFLoss, LPELoss, slices
from respmotion.models.prior import prior_from_record
from respmotion.training.autoencoder import AutoencoderRunConfig, make_dataset, train_autoencoder
from respmotion.training.autoencoder_eval import evaluate_model
from respmotion.training.splits import split_patients

SHAPE = (8, 32, 32)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from respmotion.data.phantom import write_cohort

    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, 5, seed=3, shape=SHAPE)
    return root


def tiny(kind, **kw):
    return build_autoencoder(default_net_config(kind, base_channels=8, norm_groups=8, dropout=0.0, **kw))


# ------------------------------------------------------------------------------ models
def test_default_latent_shapes_and_anisotropic_downsampling():
    assert Autoencoder(default_net_config("image")).latent_shape((50, 256, 256)) == (3, 50, 32, 32)
    assert Autoencoder(default_net_config("dvf")).latent_shape((50, 256, 256)) == (9, 50, 32, 32)
    img, dvf = tiny("image"), tiny("dvf")
    out = img(torch.zeros(2, 1, 5, 32, 24))
    assert out.recon.shape == (2, 1, 5, 32, 24) and out.mu.shape == (2, 3, 5, 4, 3) and out.logvar is None
    out = dvf.train()(torch.zeros(1, 3, 6, 16, 16))
    assert out.recon.shape == (1, 3, 6, 16, 16) and out.mu.shape == out.logvar.shape == (1, 9, 6, 2, 2)
    with pytest.raises(ValueError, match="divisible"):
        img.encode(torch.zeros(1, 1, 5, 30, 32))


def test_units_and_latent_codec_roundtrip():
    img = tiny("image")
    hu = torch.tensor([-2000.0, -1000.0, 0.0, 1000.0, 3000.0])
    np.testing.assert_allclose(img.normalize(hu).numpy(), [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(img.denormalize(img.normalize(hu)).numpy(), [-1000, -1000, 0, 1000, 1000])
    dvf = tiny("dvf").eval()
    assert float(dvf.normalize(torch.tensor(25.0))) == 2.5  # mm / 10 mm
    dvf.latent_scale.fill_(0.5)
    u = torch.randn(1, 3, 4, 16, 16)
    z = dvf.encode_latent(u)
    assert z.shape == (1, 9, 4, 2, 2)
    torch.testing.assert_close(z, dvf.encode(dvf.normalize(u)) * 0.5)
    with torch.no_grad():
        torch.testing.assert_close(dvf.decode_latent(z), dvf.denormalize(dvf.decode(z / 0.5)))
    # eval mode decodes the mean: deterministic
    torch.testing.assert_close(dvf(u).recon, dvf(u).recon)


def test_coarse_dvf_decoder_shapes_and_levels():
    for k in (0, 1, 2, 3):
        m = tiny("dvf", coarse_levels=k).eval()
        z = torch.zeros(2, 9, 5, 2, 3)
        assert m.decoder(z).shape == (2, 3, 5, 2 * 2 ** (3 - k), 3 * 2 ** (3 - k))  # its own output, k levels early
        assert m.decode(z).shape == (2, 3, 5, 16, 24)  # always the full grid
        assert m(torch.zeros(1, 3, 5, 16, 24)).recon.shape == (1, 3, 5, 16, 24)
    assert default_net_config("image").coarse_levels == 0 and default_net_config("dvf").coarse_levels == COARSE_LEVELS_DVF
    assert default_net_config("dvf", channel_mults=(1, 2)).coarse_levels == min(2, COARSE_LEVELS_DVF)  # at most the levels
    with pytest.raises(ValueError, match="coarse_levels"):
        tiny("dvf", coarse_levels=4)


def test_checkpoint_without_coarse_levels_loads_as_full_resolution(tmp_path):
    """Checkpoints written before the option have no ``coarse_levels`` key: the full-resolution decoder,
    the same weights and the same output as before."""
    torch.manual_seed(0)
    full = tiny("dvf", coarse_levels=0).eval()
    stored = full.cfg.to_dict()
    del stored["coarse_levels"]
    assert AutoencoderNetConfig.from_dict(stored).resolved().coarse_levels == 0
    path = tmp_path / "old.pt"
    torch.save({"task": "autoencoder_dvf", "model_config": stored, "model": full.state_dict()}, path)
    old = load_autoencoder(str(path))
    assert old.cfg.coarse_levels == 0 and list(old.state_dict()) == list(full.state_dict())
    z = torch.randn(1, 9, 4, 2, 2)
    with torch.no_grad():
        assert torch.equal(old.decode(z), full.decode(z))


def test_upsample_field_reproduces_smooth_fields():
    """Coarse samples at the coarse voxel centres (align_corners=False: fine index j * f + (f - 1) / 2)
    come back exactly for a linear field away from the border, closely for a smooth one, and
    the decoder's upsampling is this function."""
    f = (1, 4, 4)
    fine = [torch.arange(n, dtype=torch.float64) for n in (6, 32, 32)]
    coarse = [(torch.arange(n // k, dtype=torch.float64) * k + (k - 1) / 2) for n, k in zip((6, 32, 32), f)]

    def field(z, y, x, fn):
        zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
        return torch.stack([fn(zz, yy, xx), 2 * fn(zz, yy, xx), -fn(zz, yy, xx)])[None]

    linear = lambda z, y, x: 0.3 * z + 0.05 * y - 0.02 * x  # noqa: E731
    up = upsample_field(field(*coarse, linear), f)
    assert up.shape == (1, 3, 6, 32, 32)
    inner = (slice(None), slice(None), slice(None), slice(2, -2), slice(2, -2))  # between the outermost centres
    torch.testing.assert_close(up[inner], field(*fine, linear)[inner])
    smooth = lambda z, y, x: 5 * torch.sin(y / 32 * torch.pi) * torch.cos(x / 32 * torch.pi)  # noqa: E731 mm
    err = (upsample_field(field(*coarse, smooth), f) - field(*fine, smooth)).abs()
    peak = 10.0  # mm, the largest component (2 * 5 mm)
    assert float(err[inner].max()) < 0.05 * peak and float(err[inner].mean()) < 0.01 * peak
    m = tiny("dvf", coarse_levels=2).eval()
    z = torch.randn(1, 9, 3, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(m.decode(z), upsample_field(m.decoder(z), m.output_factor))


def test_kl_is_zero_for_standard_normal_and_positive_otherwise():
    mu, logvar = torch.zeros(2, 9, 2, 2, 2), torch.zeros(2, 9, 2, 2, 2)
    assert float(kl_divergence(mu, logvar)) == 0.0
    assert float(kl_divergence(mu + 1.0, logvar)) == pytest.approx(0.5 * 9 * 8)


# ------------------------------------------------------------------------------ losses
def test_slices_views():
    x = torch.arange(2 * 1 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 1, 3, 4, 5)
    assert slices(x, "axial").shape == (6, 1, 4, 5)
    assert slices(x, "coronal").shape == (8, 1, 3, 5)
    assert slices(x, "sagittal").shape == (10, 1, 3, 4)
    torch.testing.assert_close(slices(x, "coronal")[1, 0], x[0, 0, :, 1, :])
    torch.testing.assert_close(slices(x, "sagittal")[5 + 2, 0], x[1, 0, :, :, 2])


def test_lpe_loss_terms():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 12, 16, 16, generator=g) * 2 - 1
    loss = LPELoss(l1_weight=0.5, ssim_weight=0.3, edge_weight=0.2)
    same = loss(x, x)
    assert float(same["loss"]) == pytest.approx(0.0, abs=1e-5)
    other = loss(x, x.flip(-1))
    assert float(other["ssim"]) > 0.1 and float(other["edge"]) > 0.1
    expect = 0.5 * other["l1"] + 0.3 * other["ssim"] + 0.2 * other["edge"]
    torch.testing.assert_close(other["loss"], expect)
    with pytest.raises(ValueError, match="view"):
        LPELoss(views=("transverse",))


def test_dvf_loss_is_in_millimetres():
    target = torch.zeros(1, 3, 4, 8, 8)
    pred = target + 0.1  # network units: 0.1 * 10 mm = 1 mm per component
    out = DVFLoss(dvf_scale_mm=10.0, mse_weight=1.0)(pred, target, kl=torch.tensor(5.0))
    assert float(out["l1_mm"]) == pytest.approx(1.0)
    assert float(out["mse_mm2"]) == pytest.approx(1.0)
    assert float(out["loss"]) == pytest.approx(1.0 + 1.0 + 1e-7 * 5.0)


# ------------------------------------------------------------------------------ split
def test_patient_split_is_disjoint_complete_and_seeded():
    ids = [f"p{i:02d}" for i in range(20)]
    s = split_patients(ids, (0.8, 0.1, 0.1), seed=42)
    assert (len(s.train), len(s.val), len(s.test)) == (16, 2, 2)
    assert set(s.train) | set(s.val) | set(s.test) == set(ids)
    assert not (set(s.train) & set(s.val) or set(s.train) & set(s.test) or set(s.val) & set(s.test))
    assert split_patients(list(reversed(ids)), (0.8, 0.1, 0.1), seed=42) == s
    assert split_patients(ids, (0.8, 0.1, 0.1), seed=1) != s
    small = split_patients(["a", "b", "c"], (0.8, 0.1, 0.1), 42)
    assert (len(small.train), len(small.val), len(small.test)) == (1, 1, 1)


# ------------------------------------------------------------------------------ acceptance
def _run_cfg(cohort, kind, tmp_path, steps):
    cfg = AutoencoderRunConfig(kind=kind)
    cfg.data.root = str(cohort)
    cfg.data.field_source = "gt_ref"
    # tiny: base 16, two levels (4x in-plane, latent 8x8 at 32x32); pure L1 for the image AE
    cfg.model.base_channels, cfg.model.norm_groups, cfg.model.dropout, cfg.model.channel_mults = 16, 8, 0.0, (1, 2)
    cfg.image_loss.l1_weight, cfg.image_loss.ssim_weight = 1.0, 0.0
    cfg.run_dir = str(tmp_path / f"run_{kind}")
    t = cfg.train
    t.steps, t.batch_size, t.grad_accum, t.num_workers = steps, 2, 1, 0
    t.lr_max, t.lr_min, t.warmup_steps = 5e-3, 1e-4, 10
    t.log_every, t.val_every, t.ckpt_every, t.image_every = 50, steps, steps, steps
    return cfg


def _mean_baselines(cfg, split, kind):
    """Errors (HU MAE or mean mm vector error) on the test items of two trivial predictors:
    the voxel-wise mean of the training items, and each item's own mean value (a constant)."""
    train = make_dataset(cfg, split["train"])
    test = make_dataset(cfg, split["test"])
    clip = (lambda v: v.clamp(-1000, 1000)) if kind == "image" else (lambda v: v)
    mean = clip(torch.stack([train[i]["x"] for i in range(len(train))])).mean(0)
    err = (lambda a, b: (a - b).abs().mean()) if kind == "image" else (lambda a, b: (a - b).norm(dim=0).mean())
    voxel, const = [], []
    for i in range(len(test)):
        x = clip(test[i]["x"])
        voxel.append(float(err(x, mean)))
        const.append(float(err(x, x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x))))
    return float(np.mean(voxel)), float(np.mean(const))


@pytest.mark.parametrize("kind,steps", [("image", 400), ("dvf", 300)])
def test_autoencoder_trains_and_beats_mean_prediction(cohort, tmp_path, kind, steps):
    cfg = _run_cfg(cohort, kind, tmp_path, steps=steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread wastes nothing and suffers no contention
    try:
        res = train_autoencoder(cfg)
    finally:
        torch.set_num_threads(threads)
    ckpt = torch.load(res.model_path, map_location="cpu", weights_only=True)
    split = ckpt["extra"]["split"]
    assert split["test"] and not set(split["test"]) & set(split["train"])
    model = load_autoencoder(str(res.model_path))
    assert float(model.latent_scale) != 1.0  # set from training latents
    prior = prior_from_record(ckpt["extra"].get("motion_prior"))
    assert (prior is not None) == (kind == "dvf")  # the DVF VAE codes u - (mean training field), by default
    if prior is not None:
        assert prior.meta["patients"] == split["train"] and prior.ids == [f"ref_{k:02d}" for k in range(10, 100, 10)]
    metrics = evaluate_model(model, make_dataset(cfg, split["test"]), torch.device("cpu"), prior=prior)
    voxel_mean, const_mean = _mean_baselines(cfg, split, kind)
    key = "mae_hu" if kind == "image" else "error_mean_mm"
    err = metrics["mean"][key]
    print(f"{kind}: test {key} {err:.3f} (prior alone {metrics['mean'].get('prior_error_mean_mm')}); predicting the training mean volume {voxel_mean:.3f}, "
          f"each item's mean value {const_mean:.3f}; train loss {res.history['train'][0][1]:.4f} -> "
          f"{res.history['train'][-1][1]:.4f}")
    assert err < 0.25 * const_mean
    # held-out patient of a cohort sharing one anatomy template: the mean volume is a strong predictor
    # of the CT (texture does not generalise from 3 patients in a few hundred steps); motion fields do
    assert err < (0.95 if kind == "image" else 0.5) * voxel_mean
    assert (res.run_dir / "config.yaml").exists() and (res.run_dir / "split.json").exists()
    assert list(res.run_dir.glob("events.out.tfevents.*"))

    # the CLI evaluates the stored test split and writes metrics.json beside its config
    assert cli_main(["evaluate", "autoencoder", "--checkpoint", str(res.run_dir), "--out", str(tmp_path / "ev")]) == 0
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert written["patients"] == split["test"] and (tmp_path / "ev" / "config.yaml").exists()
    assert written["mean"][key] == pytest.approx(metrics["mean"][key], rel=1e-4)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert cli_main(["train", "autoencoder", "--kind", "image", "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli_main(["evaluate", "autoencoder", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pt" in err[0]


# ------------------------------------------------------------------------------ motion prior
def test_motion_prior_mean_files_hash_and_residual_items(cohort, tmp_path):
    from respmotion.models.prior import MotionPrior
    from respmotion.training.data import FieldDataset, GroundTruthFields
    from respmotion.training.splits import studies_of

    studies = studies_of(cohort, ["phantom_000", "phantom_001"])
    src = GroundTruthFields("ref")
    full = FieldDataset(studies, src)
    prior = MotionPrior.from_fields((full.raw(i) for i in range(len(full))), {"patients": ["phantom_000", "phantom_001"]})
    want = (studies[0].load_gt("ref", 40).array + studies[1].load_gt("ref", 40).array) / 2
    assert prior.ids == [f"ref_{k:02d}" for k in range(10, 100, 10)]
    assert np.allclose(prior.field("ref_40"), want, atol=1e-6) and prior.meta["items_per_id"]["ref_40"] == 2
    npy = prior.save(tmp_path / "p")
    back = MotionPrior.load(tmp_path / "p", sha256=prior.record()["sha256"])
    assert np.array_equal(back.fields, prior.fields) and back.ids == prior.ids
    resid = FieldDataset(studies, src, prior)
    item = resid[3]
    assert item["field_id"] == full[3]["field_id"]
    assert torch.allclose(item["x"] + torch.from_numpy(prior.field(item["field_id"])), full[3]["x"], atol=1e-5)
    with pytest.raises(ValueError, match="no field 'step_00'"):
        prior.field("step_00")
    arr = np.load(npy)
    arr[0, 0, 0, 0, 0] += 1.0
    np.save(npy, arr)  # a changed prior file is refused: its hash no longer matches the record
    with pytest.raises(ValueError, match="sha256"):
        MotionPrior.load(npy)
