"""Noise schedule and samplers: forward statistics, DDIM vs DDPM posterior, exactness on a
Gaussian whose optimal denoiser is known in closed form, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from respmotion.diffusion.config import SamplerConfig, ScheduleConfig
from respmotion.diffusion.schedulers import (
    DDIMSampler,
    NoiseSchedule,
    make_sampler,
    run_sampler,
    trailing_timesteps,
)

N = 20000


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(prediction_type="epsilon"))


def gaussian_oracle(sch: NoiseSchedule, m: float, s: float, v: bool = False):
    """Exact E[eps | x_t] (or v) when x0 ~ N(m, s^2) elementwise."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = sch.alpha_bar(int(t[0]))
        eps = math.sqrt(1 - ab) * (x - math.sqrt(ab) * m) / (ab * s * s + 1 - ab)
        if not v:
            return eps
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        return math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0

    return fn


def test_forward_noising_statistics(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((N,), 0.7)
    for t in (0, 10, 250, 500, 999):
        noise = torch.randn(N, generator=g)
        xt = sched.add_noise(x0, noise, torch.tensor([t]))
        ab = sched.alpha_bar(t)
        tol = 5 * math.sqrt(1 - ab) / math.sqrt(N)
        assert abs(float(xt.mean()) - math.sqrt(ab) * 0.7) < tol
        assert abs(float(xt.std()) - math.sqrt(1 - ab)) < 0.03 * math.sqrt(1 - ab)
    # the end of the schedule is (almost) pure noise, the start (almost) clean
    assert sched.alpha_bar(999) < 1e-3 and sched.alpha_bar(0) > 0.999


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_target_and_split_round_trip(pred):
    sch = NoiseSchedule(ScheduleConfig(prediction_type=pred))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(64, generator=g), torch.randn(64, generator=g)
    for t in (3, 400, 990):
        xt = sch.add_noise(x0, eps, torch.tensor([t]))
        x0_hat, eps_hat = sch.split(sch.target(x0, eps, torch.tensor([t])), xt, t)
        assert torch.allclose(x0_hat, x0, atol=2e-3 if t > 900 else 1e-4)
        assert torch.allclose(eps_hat, eps, atol=1e-4)


def test_trailing_timesteps_and_delta_t(sched):
    ts = trailing_timesteps(1000, 200)
    assert ts[0] == 999 and ts[-1] == 4 and len(ts) == 200
    assert all(a - b == 5 for a, b in zip(ts, ts[1:]))
    smp = make_sampler(sched, SamplerConfig(name="ddim", delta_t=5))
    assert smp.timesteps == ts and smp.prev(199) == -1
    assert make_sampler(sched, SamplerConfig(name="dpmpp2m", steps=20)).num_steps == 20
    with pytest.raises(ValueError, match="delta_t"):
        make_sampler(sched, SamplerConfig(name="ddim", delta_t=7))
    with pytest.raises(ValueError, match="ddpm"):
        make_sampler(sched, SamplerConfig(name="ddpm", steps=50))
    with pytest.raises(ValueError, match="sampler must be"):
        make_sampler(sched, SamplerConfig(name="euler"))


def test_ddpm_step_matches_monai_scheduler(sched):
    """Our DDPM step (shared-noise capable) equals MONAI's DDPMScheduler.step for the same draw."""
    ref = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    ref.betas = ref.betas.double()  # same float64 tables as ours: this compares the step logic
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, 0)
    smp = make_sampler(sched, SamplerConfig(name="ddpm"))
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    for i in (0, 500, 998, 999):
        t = smp.timesteps[i]
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        ours = smp.step(i, out, x, lambda: torch.randn(x.shape, generator=g1))
        theirs, _ = ref.step(out, t, x, generator=g2)
        assert torch.allclose(ours, theirs, atol=1e-6), t


def test_ddim_all_steps_matches_ddpm_posterior_mean(sched):
    """DDIM over all T steps: eta = 1 is exactly DDPM (mean and variance); eta = 0 stays within a
    fraction of the posterior std of DDPM's posterior mean, the fraction shrinking with t."""
    T = sched.T
    every = list(range(T - 1, -1, -1))
    d0, d1 = DDIMSampler(sched, every, 0.0), DDIMSampler(sched, every, 1.0)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    zero = lambda: torch.zeros(4096)  # noqa: E731  (compare means: no added noise)
    for t in range(1, T):
        i = T - 1 - t
        xt = sched.add_noise(x0, eps, torch.tensor([t]))
        # DDPM posterior q(x_{t-1} | x_t, x0) in closed form from alpha-bar alone (Ho et al. 2020, eqs. 6-7)
        ab, abp = sched.alpha_bar(t), sched.alpha_bar(t - 1)
        beta = 1.0 - ab / abp
        mean = (math.sqrt(abp) * beta * x0 + math.sqrt(1.0 - beta) * (1.0 - abp) * xt) / (1.0 - ab)
        std = math.sqrt((1.0 - abp) / (1.0 - ab) * beta)
        assert torch.allclose(d1.step(i, eps, xt, zero), mean, atol=2e-5), t
        gap = float((d0.step(i, eps, xt, zero) - mean).abs().max()) / (std * float(eps.abs().max()))
        assert gap < (0.45 if t < 10 else 0.2 if t < 100 else 0.08), (t, gap)


@pytest.mark.parametrize(
    "cfg, std_tol",
    [
        (SamplerConfig(name="ddpm"), 0.03),
        (SamplerConfig(name="ddim", delta_t=5), 0.03),
        (SamplerConfig(name="ddim", steps=1000), 0.03),
        (SamplerConfig(name="dpmpp2m", steps=20), 0.03),
    ],
)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_samplers_recover_gaussian_with_exact_denoiser(cfg, std_tol, pred):
    """With the closed-form optimal model for x0 ~ N(0.2, 1), samples have that mean and std."""
    sch = NoiseSchedule(ScheduleConfig(prediction_type=pred))
    smp = make_sampler(sch, cfg)
    g = torch.Generator().manual_seed(4)
    x = run_sampler(smp, gaussian_oracle(sch, 0.2, 1.0, pred == "v_prediction"), torch.randn(N, generator=g),
                    lambda: torch.randn(N, generator=g))
    assert abs(float(x.mean()) - 0.2) < 0.03
    assert abs(float(x.std()) - 1.0) < std_tol


def test_fast_sampler_close_to_ddim200_on_same_noise(sched):
    oracle = gaussian_oracle(sched, 0.0, 1.0)
    xT = torch.randn(N, generator=torch.Generator().manual_seed(5))
    ddim = run_sampler(make_sampler(sched, SamplerConfig(name="ddim")), oracle, xT, lambda: None)
    fast = run_sampler(make_sampler(sched, SamplerConfig(name="dpmpp2m", steps=20)), oracle, xT, lambda: None)
    few_ddim = run_sampler(make_sampler(sched, SamplerConfig(name="ddim", steps=20)), oracle, xT, lambda: None)
    err_fast, err_ddim20 = float((fast - ddim).abs().mean()), float((few_ddim - ddim).abs().mean())
    assert err_fast < 0.02
    assert err_fast < 0.5 * err_ddim20  # the multistep solver beats DDIM at equal step count


def test_sampler_determinism(sched):
    oracle = gaussian_oracle(sched, 0.0, 0.5)

    def draw(seed: int, name: str, **kw) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        smp = make_sampler(sched, SamplerConfig(name=name, **kw))
        return run_sampler(smp, oracle, torch.randn(256, generator=g), lambda: torch.randn(256, generator=g))

    for name, kw in (("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpmpp2m", {"steps": 15})):
        a, b, c = draw(11, name, **kw), draw(11, name, **kw), draw(12, name, **kw)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
