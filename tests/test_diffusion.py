"""Diffusion UNet, cycle sampling, EMA, step-mode composition, and the whole chain on a tiny phantom:
autoencoders -> latents -> diffusion -> sample -> decode, checked against the exact motion."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from respmotion.config import load_config
from respmotion.diffusion.config import DiffusionModelConfig, SamplerConfig, UNetConfig
from respmotion.diffusion.model import LatentDiffusion
from respmotion.diffusion.pipeline import MotionGenerator
from respmotion.diffusion.sampling import LatentNorm, sample_cycle, sample_cycles
from respmotion.diffusion.schedulers import NoiseSchedule, make_sampler
from respmotion.diffusion.unet import PhaseConditionedUNet, crop_to, pad_to_multiple

TINY = UNetConfig(channels=(8, 16, 16), attention_levels=(False, False, False), norm_num_groups=8,
                  num_head_channels=8, num_res_blocks=1)


def test_pad_to_multiple_and_crop_round_trip():
    x = torch.randn(2, 12, 50, 32, 30)
    y, size = pad_to_multiple(x, 4)
    assert y.shape[-3:] == (52, 32, 32) and size == (50, 32, 30)
    assert torch.equal(crop_to(y, size), x)
    assert torch.equal(y[:, :, 50], y[:, :, 49])  # replicate padding continues the border slice


def _perturbed(net: PhaseConditionedUNet) -> PhaseConditionedUNet:
    """MONAI zero-initialises the output convolution; perturb every weight so outputs depend on inputs."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_unet_keeps_depth_50_and_uses_phase():
    torch.manual_seed(0)
    net = _perturbed(PhaseConditionedUNet(TINY))
    x, img = torch.randn(2, 9, 50, 8, 8), torch.randn(1, 3, 50, 8, 8)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        a = net(x, img, t, torch.tensor([1, 5]))
        b = net(x, img, t, torch.tensor([2, 5]))
    assert a.shape == x.shape
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="differ in size"):
        net(x, torch.randn(1, 3, 48, 8, 8), t, torch.tensor([1, 5]))


def _phase_blind(net: PhaseConditionedUNet) -> PhaseConditionedUNet:
    with torch.no_grad():
        net.net.class_embedding.weight.zero_()
    return net.eval()


def test_one_cycle_is_one_draw():
    """Shared noise: a model that ignores the phase gives identical phases; per-phase noise does not."""
    torch.manual_seed(0)
    net = _phase_blind(_perturbed(PhaseConditionedUNet(TINY)))
    sampler = make_sampler(NoiseSchedule(DiffusionModelConfig().schedule), SamplerConfig(name="ddim", steps=4))
    img = torch.randn(3, 8, 8, 8)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    shared = sample_cycle(net, img, [10, 50, 90], sampler, gen())
    assert shared.shape == (3, 9, 8, 8, 8)
    assert torch.allclose(shared[0], shared[1]) and torch.allclose(shared[0], shared[2])
    fresh = sample_cycle(net, img, [10, 50, 90], sampler, gen(), shared_noise=False)
    assert not torch.allclose(fresh[0], fresh[1], atol=1e-2)
    # determinism and independence of samples
    again = sample_cycle(net, img, [10, 50, 90], sampler, gen())
    assert torch.equal(shared, again)
    stochastic = make_sampler(sampler.schedule, SamplerConfig(name="ddim", steps=4, eta=1.0))
    two = sample_cycles(net, img, [10, 50], stochastic, gen(), 2)
    assert two.shape == (2, 2, 9, 8, 8, 8) and not torch.allclose(two[0], two[1], atol=1e-2)
    assert torch.allclose(two[0, 0], two[0, 1])  # step noise (eta > 0, DDPM) is shared across the phases too


def test_ema_update_rule_and_optimizer_skip():
    torch.manual_seed(0)
    m = LatentDiffusion(DiffusionModelConfig(unet=TINY), ema_decay=0.5)
    assert all(not p.requires_grad for p in m.ema.parameters())
    p_on, p_ema = next(m.unet.parameters()), next(m.ema.parameters())
    before = p_ema.detach().clone()
    with torch.no_grad():
        p_on.add_(1.0)
    assert m.update_ema(1) and not m.update_ema(1)  # once per optimizer step
    d = min(0.5, 1.0 / 10.0)  # warm-up rule (1 + n) / (10 + n) at n = 0
    assert torch.allclose(p_ema, before * d + (before + 1.0) * (1 - d))
    sd = m.state_dict()
    assert int(sd["ema_updates"]) == 1 and "ema.net.conv_in.conv.weight" in sd


def test_x0_prediction_round_trip_and_default():
    from respmotion.diffusion.config import ScheduleConfig

    assert ScheduleConfig().prediction_type == "sample"
    sch = NoiseSchedule(ScheduleConfig(prediction_type="sample"))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(64, generator=g), torch.randn(64, generator=g)
    for t in (3, 400, 990):
        xt = sch.add_noise(x0, eps, torch.tensor([t]))
        assert torch.equal(sch.target(x0, eps, torch.tensor([t])), x0)
        x0_hat, eps_hat = sch.split(x0, xt, t)
        assert torch.allclose(x0_hat, x0) and torch.allclose(eps_hat, eps, atol=1e-4)


def test_image_condition_deviation_from_the_training_mean():
    """'both' feeds the standardised latent and its deviation from the voxel-wise training mean."""
    from respmotion.diffusion.model import ImageCondition

    torch.manual_seed(0)
    base = torch.randn(3, 4, 4, 4)
    latents = torch.stack([base + 0.05 * torch.randn(3, 4, 4, 4) for _ in range(4)])  # patients differ a little
    mean = latents.mean(0)
    std = (latents - mean).transpose(0, 1).reshape(3, -1).pow(2).mean(1).sqrt()
    cond = ImageCondition("both", LatentNorm(torch.zeros(3), torch.ones(3)), mean, std)
    out = cond(latents)
    assert out.shape == (4, 6, 4, 4, 4)
    assert torch.equal(out[:, :3], latents)
    dev = out[:, 3:]
    assert abs(float(dev.std()) - 1.0) < 0.05  # the across-patient part, amplified to unit scale
    with pytest.raises(ValueError, match="differs in size"):
        cond(torch.randn(1, 3, 4, 4, 8))
    m = LatentDiffusion(DiffusionModelConfig(unet=TINY, anatomy_condition=False), image_mean=mean, image_std=std)
    assert m.unet.net.conv_in.conv.in_channels == 6 + 9


def test_anatomy_condition_adds_standardised_clipped_feature_channels():
    """The CT's lung features reach the UNet as constant channels (f - mean) / std, clipped to +-3."""
    from respmotion.anatomy.features import LUNG_FEATURES
    from respmotion.diffusion.model import AnatomyCondition

    nf = len(LUNG_FEATURES)
    mean, std = torch.tensor([2000.0, 100.0, 150.0]), torch.tensor([500.0, 10.0, 20.0])
    m = LatentDiffusion(DiffusionModelConfig(unet=TINY), anatomy_stats=(mean, std))
    assert isinstance(m.anatomy, AnatomyCondition) and m.anatomy.channels == nf
    assert m.unet.net.conv_in.conv.in_channels == 3 * 2 + nf + 9  # image 'both' + features + DVF latent
    img = torch.randn(2, 3, 4, 4, 4)
    feats = torch.tensor([[2500.0, 90.0, 150.0], [2000.0, 100.0, 400.0]])
    cond = m.condition(img, feats)
    assert cond.shape == (2, 6 + nf, 4, 4, 4)
    assert torch.allclose(cond[:, 6:, 1, 2, 3], torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 3.0]]))  # 12.5 -> 3
    assert torch.equal(cond[:, 6:].amin((2, 3, 4)), cond[:, 6:].amax((2, 3, 4)))  # constant over space
    with pytest.raises(ValueError, match="lung features"):
        m.condition(img)


class _Oracle(nn.Module):
    """x0-prediction net that always predicts ``truth`` (repeated per sample): a perfect, certain generator."""

    def __init__(self, truth: torch.Tensor, k: int):
        super().__init__()
        self.truth = truth.repeat_interleave(k, 0)

    def forward(self, x_t, cond, t, phase):
        return self.truth


def test_validation_scores_of_the_generator_in_latent_units(monkeypatch):
    """val_metrics (TensorBoard val/energy_score, val/mean_error, val/spread): a generator that always returns
    the truth scores 0; an untrained one scores its mean distance minus half its spread term, all finite."""
    from respmotion.diffusion.task import DiffusionTask

    torch.manual_seed(0)
    cfg = DiffusionModelConfig(unet=TINY, anatomy_condition=False)
    task = DiffusionTask(cfg, LatentNorm.identity(3), LatentNorm.identity(9, 10), 0.99, 10,
                         sampler=SamplerConfig(name="dpmpp2m", steps=5), val_samples=4)
    model = task.build_model().eval()
    _perturbed(model.ema)
    batch = {"x": torch.randn(2, 9, 4, 4, 4), "image": torch.randn(2, 3, 4, 4, 4), "phase": torch.tensor([3, 5]),
             "key": ["a", "b"]}
    scores = task.val_metrics(model, batch)
    assert set(scores) == {"energy_score", "mean_error", "spread"} and all(math.isfinite(v) for v in scores.values())
    assert scores["spread"] > 0 and scores["energy_score"] < scores["mean_error"] + scores["spread"]
    monkeypatch.setattr(model, "sampling_net", lambda use_ema=True: _Oracle(batch["x"], 4))
    perfect = task.val_metrics(model, batch)
    assert perfect["energy_score"] == pytest.approx(0.0, abs=1e-5) and perfect["spread"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["mean_error"] == pytest.approx(0.0, abs=1e-5)


class _StubAE(nn.Module):
    """Stand-in autoencoder: latent = field averaged over 2x2 in-plane blocks (enough to test plumbing)."""

    def __init__(self, channels: int):
        super().__init__()
        self.c = channels
        self.w = nn.Parameter(torch.zeros(1))

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        z = nn.functional.avg_pool3d(x, (1, 2, 2))
        return z.repeat(1, self.c // x.shape[1], 1, 1, 1) if self.c >= x.shape[1] else z[:, : self.c]

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(z[:, :3], scale_factor=(1, 2, 2), mode="nearest")


def test_step_mode_cycle_is_composed_not_summed():
    """In step mode the generator chains the ten transitions with compose: a constant shift s per
    transition composes to k*s at phase k and the closure error of 10 equal shifts is 10*s."""
    torch.manual_seed(0)
    cfg = DiffusionModelConfig(target="step", unet=UNetConfig(**{**TINY.__dict__, "dvf_channels": 3}),
                               anatomy_condition=False)  # a blank CT: no lungs to measure
    model = LatentDiffusion(cfg)
    gen = MotionGenerator(model, _StubAE(3), _StubAE(3))
    shift = torch.tensor([1.5, -0.5, 0.25]).view(1, 1, 3, 1, 1, 1)
    gen.sample_latents = lambda img, phases, sampler=None, seed=0, num_samples=1: (  # type: ignore[method-assign]
        shift.expand(num_samples, len(phases), 3, 4, 4, 4).clone())
    res = gen.cycle(torch.zeros(4, 8, 8), (2.0, 1.0, 1.0), num_samples=1)
    assert res.fields.shape == (1, 10, 3, 4, 8, 8)
    for k in range(10):
        assert torch.allclose(res.fields[0, k], k * shift[0, 0].expand(3, 4, 8, 8), atol=1e-5)
    assert res.closure_mm is not None and math.isclose(res.closure_mm[0], 10 * float(shift.norm()), rel_tol=1e-4)


# ---------------------------------------------------------------------------- the whole chain
SHAPE = (8, 32, 32)  # latent 8x4x4: small enough for CI on 2 CPU cores
PATIENTS = 12  # 10 train + 2 held out (split 0.84 / 0 / 0.16): with 5 training patients the held-out motion
# was not learnable (generated 0.92 vs population mean 0.81 mm); with 10 it is (see the chain test)


def _ae_config(kind: str, root, out, steps: int, prior: str = "mean", extra: tuple[str, ...] = ()):
    from respmotion.training.autoencoder import AutoencoderRunConfig

    return load_config(AutoencoderRunConfig, None, None, [
        f"kind={kind}", f"data.root={root}", f"run_dir={out}/ae_{kind}", "data.field_source=gt_ref",
        f"data.motion_prior={prior}",
        "data.patient_split.ratios=[0.84,0.0,0.16]", "model.base_channels=8", "model.norm_groups=8", "model.dropout=0",
        "model.coarse_levels=0",  # full-resolution decoder: the library's default 3 levels suit 256 voxels in-plane
        "image_loss.views=[axial]", "dvf_loss.kl_weight=1e-6", "dvf_loss.mse_weight=1.0",
        f"train.steps={steps}", "train.batch_size=4", "train.grad_accum=1", "train.lr_max=3e-3", "train.lr_min=3e-4",
        "train.warmup_steps=10", "train.num_workers=0", "train.val_every=0", "train.ckpt_every=100000",
        "train.log_every=1000", "train.image_every=0", "train.device=cpu", *extra])


def build_chain(tmp, prior: str = "mean", dvf_steps: int = 250, diffusion: tuple[str, ...] = (),
                dvf: tuple[str, ...] = (), patients: int = PATIENTS) -> dict:
    """Phantom -> image AE + DVF VAE -> latent set -> diffusion (ref mode) -> a MotionGenerator.

    ``prior``: the DVF VAE's motion prior mode; ``diffusion``: extra overrides of the diffusion run."""
    from respmotion.data.phantom import write_cohort
    from respmotion.diffusion.latents import build_latent_set
    from respmotion.diffusion.train import DiffusionRunConfig, train_diffusion
    from respmotion.training.autoencoder import train_autoencoder

    logging.getLogger("respmotion").setLevel(logging.WARNING)
    root, runs = tmp / "cohort", tmp / "runs"
    # one breathing curve for all: a patient's timing cannot be read from its CT, and with patient curves the
    # tiny chain (12 patients, 200 diffusion steps) no longer beats the population mean on held-out patients
    # (1.83-2.25 vs 1.37-1.85 mm with 12-48 patients); the demo's 48-patient model does (docs/demo.md)
    write_cohort(root, patients, seed=3, shape=SHAPE, phase_curve="population")
    image_ae = train_autoencoder(_ae_config("image", root, runs, 40)).model_path
    dvf_ae = train_autoencoder(_ae_config("dvf", root, runs, dvf_steps, prior, dvf)).model_path
    build_latent_set(root, tmp / "latents", image_ae, dvf_ae, fields=("gt_ref",), device="cpu")
    cfg = load_config(DiffusionRunConfig, None, None, [
        f"data.latents={tmp / 'latents'}", f"run_dir={runs}/diffusion",
        "model.unet.channels=[16,32,32]", "model.unet.attention_levels=[false,false,false]",
        "model.unet.norm_num_groups=8", "model.unet.num_head_channels=8", "model.unet.num_res_blocks=1",
        "ema_decay=0.99", "train.steps=200", "train.batch_size=8", "train.grad_accum=1", "train.lr_max=2e-3",
        "train.lr_min=1e-4", "train.warmup_steps=20", "train.num_workers=0", "train.val_every=0",
        "train.ckpt_every=100000", "train.log_every=1000", "train.image_every=0", "train.device=cpu", *diffusion])
    res = train_diffusion(cfg)
    gen = MotionGenerator.from_checkpoints(res.model_path, device="cpu")
    return {"root": root, "gen": gen, "split": gen.extra["split"], "run": res}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return build_chain(tmp_path_factory.mktemp("chain"))


def _lung_error(field: torch.Tensor, gt: np.ndarray, lung: np.ndarray) -> float:
    return float(np.linalg.norm(field.numpy() - gt, axis=0)[lung].mean())


def _evaluate(chain, patients: list[str], sampler: SamplerConfig, seed: int = 0) -> dict:
    from respmotion.io.layout import PHASES, iter_studies

    studies = {s.patient: s for s in iter_studies(chain["root"])}
    gt = {p: np.stack([studies[p].load_gt("ref", k).array for k in PHASES]) for p in studies}
    lungs = {p: np.stack([np.load(studies[p].mask_path("lung", k)) > 0 for k in PHASES]) for p in studies}
    mean_field = np.mean([gt[p] for p in chain["split"]["train"]], axis=0)
    out: dict = {"gen": [], "zero": [], "mean": [], "curves": {}, "steps": {}}
    for p in patients:
        vol = studies[p].load_phase(0)
        res = chain["gen"].cycle(torch.from_numpy(vol.array), vol.geometry.spacing, sampler=sampler, seed=seed)
        f = res.fields[0]
        ks = range(1, 10)
        out["gen"].append(np.mean([_lung_error(f[k], gt[p][k], lungs[p][k]) for k in ks]))
        out["zero"].append(np.mean([_lung_error(torch.zeros_like(f[k]), gt[p][k], lungs[p][k]) for k in ks]))
        out["mean"].append(np.mean([_lung_error(torch.from_numpy(mean_field[k]), gt[p][k], lungs[p][k]) for k in ks]))
        lung0 = lungs[p][0]
        mag = lambda u: float(np.linalg.norm(np.asarray(u), axis=0)[lung0].mean())  # noqa: E731
        out["curves"][p] = {"generated": [mag(f[k]) for k in range(10)], "true": [mag(gt[p][k]) for k in range(10)]}
        out["steps"][p] = {"generated": [mag(f[(k + 1) % 10] - f[k]) for k in range(10)],
                           "true": [mag(gt[p][(k + 1) % 10] - gt[p][k]) for k in range(10)]}
    for k in ("gen", "zero", "mean"):
        out[k] = float(np.mean(out[k]))
    return out


STEP_FACTOR = 2.0  # a generated step between consecutive phases may be at most twice the largest true step
MEAN_FACTOR = 0.85  # generated error must be below 0.85 x the population-mean field's error


@pytest.mark.slow
def test_chain_beats_zero_and_mean_field_and_breathes_coherently(chain):
    fast = SamplerConfig(name="dpmpp2m", steps=20)
    train = _evaluate(chain, list(chain["split"]["train"]), fast)
    test = _evaluate(chain, list(chain["split"]["test"]), fast)
    assert len(chain["split"]["test"]) >= 2  # held-out patients the models never saw
    report = {"train_patients": {k: train[k] for k in ("gen", "zero", "mean")},
              "test_patients": {k: test[k] for k in ("gen", "zero", "mean")},
              "curves": {**train["curves"], **test["curves"]}, "steps": {**train["steps"], **test["steps"]}}
    print("\nCHAIN " + json.dumps(report, default=lambda v: round(float(v), 3)))
    # accuracy (lung voxels, mean over phases 10..90 and patients, mm): below no motion and clearly below
    # the population-mean field (mean over the training patients of each phase's field), on the
    # training patients and on the held-out ones
    for res in (train, test):
        assert res["gen"] < 0.35 * res["zero"], report
        assert res["gen"] < MEAN_FACTOR * res["mean"], report
    # coherence: each generated cycle rises from 0 % to a peak at 40-60 % and falls back
    for res in (train, test):
        for p, c in res["curves"].items():
            g, t = np.array(c["generated"]), np.array(c["true"])
            assert g[0] == 0.0 and 4 <= int(np.argmax(g)) <= 6, (p, g)
            assert np.corrcoef(g, t)[0, 1] > 0.9, (p, g, t)
            rise, fall = np.diff(g[:6]), np.diff(g[5:])
            assert (rise > -0.1 * g.max()).all() and (fall < 0.1 * g.max()).all(), (p, g)
            s_gen, s_true = np.array(res["steps"][p]["generated"]), np.array(res["steps"][p]["true"])
            assert s_gen.max() <= STEP_FACTOR * s_true.max(), (p, s_gen, s_true)


@pytest.mark.slow
def test_bundle_carries_the_prior_and_synthesizes_at_its_grid(chain):
    """A saved bundle finds its motion prior (path + sha256 recorded) and synthesis adds it back."""
    from respmotion.io.layout import iter_studies
    from respmotion.models.prior import MotionPrior
    from respmotion.synthesis.ldm import load_bundle

    gen = chain["gen"]
    rec = gen.extra["motion_prior"]
    assert rec["mode"] == "mean" and len(rec["sha256"]) == 64 and gen.prior is not None
    assert sorted(rec["patients"]) == sorted(chain["split"]["train"])  # never the held-out patients
    assert gen.extra["input_shape"] == list(SHAPE) == list(gen.prior.shape)
    model = load_bundle(chain["run"].model_path, sampler="dpm", steps=5)
    assert model.shape == SHAPE
    study = next(s for s in iter_studies(chain["root"]) if s.patient in chain["split"]["test"])
    ct = study.load_phase(0)
    fields = model.generate(ct, samples=1, seed=0)[0]
    # the decoded residual is small next to the prior that was added back
    res50 = fields[50].array - gen.prior.field("ref_50")
    assert np.abs(res50).mean() < 0.5 * np.abs(gen.prior.field("ref_50")).mean()
    assert not np.any(fields[0].array)
    with pytest.raises(ValueError, match="sha256"):
        MotionPrior.load(rec["path"], sha256="0" * 64)


def test_a_ct_outside_the_training_patients_is_named_in_one_warning(chain, caplog):
    """A held-out phantom lies within the training patients' lung features: no warning.  The same CT read with
    three times its slice spacing has three times its lung heights: the warning names them and their distance."""
    from respmotion.io.layout import iter_studies

    gen = chain["gen"]
    assert gen.diffusion.anatomy is not None
    study = next(s for s in iter_studies(chain["root"]) if s.patient in chain["split"]["test"])
    ct = study.load_phase(0)
    hu = torch.from_numpy(ct.array)
    with caplog.at_level(logging.WARNING, logger="respmotion"):
        gen.features(hu, ct.geometry.spacing)
    assert not caplog.records
    dz, dy, dx = ct.geometry.spacing
    with caplog.at_level(logging.WARNING, logger="respmotion"):
        f = gen.features(hu, (3 * dz, dy, dx))
    assert len(caplog.records) == 1 and "outside the patients the diffusion model was trained on" in caplog.text
    assert "lung_height_mean_mm" in caplog.text and "sd above the training mean" in caplog.text
    assert f is not None and f.shape == (3,)


@pytest.mark.slow
def test_bf16_networks_give_the_fp32_fields_within_a_few_percent(chain):
    """``precision="bf16"`` runs the networks under autocast: the cycle differs from fp32 (the setting acts) but
    by a few percent of the motion (same noise), and summary.json's motion record says which precision ran."""
    from respmotion.io.layout import iter_studies
    from respmotion.synthesis.ldm import load_bundle

    study = next(s for s in iter_studies(chain["root"]) if s.patient in chain["split"]["test"])
    ct = study.load_phase(0)
    out = {}
    for precision in ("fp32", "bf16"):
        model = load_bundle(chain["run"].model_path, sampler="dpm", steps=5, precision=precision)
        out[precision] = np.stack([f.array for k, f in sorted(model.generate(ct, samples=1, seed=0)[0].items())])
        assert model.describe()["precision"] == {"fp32": "fp32", "bf16": "bfloat16"}[precision]
        assert out[precision].dtype == np.float32
    diff = np.abs(out["bf16"] - out["fp32"]).mean()
    assert 0 < diff < 0.05 * np.abs(out["fp32"]).mean(), (diff, np.abs(out["fp32"]).mean())
