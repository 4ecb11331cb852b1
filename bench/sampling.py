"""Sampling cost and fidelity: 200-step DDIM (research default) vs the fast sampler.

    python -m bench.sampling [--device cuda] [--checkpoint runs/diffusion/<run>/model.pt]

Prints JSON: seconds per phase (batch of 1) and per cycle (all phases of one draw in one batch:
9 sampled phases in ref mode, 10 transitions in step mode) at the default latent shape (DVF
9x50x32x32, image 3x50x32x32) with the default UNet, for DDIM with delta_t = 5 (200 steps) and
DPM-Solver++(2M) with 20 steps; and the difference between the two on the same initial noise:
mean |latent difference| relative to the latents' std, for the network (trained when
``--checkpoint`` is given, else randomly initialised, which only says the solvers agree on an
arbitrary smooth vector field), and for the closed-form denoiser of a unit Gaussian (pure
solver error).  On CPU a full 200-step cycle takes too long; there the timing runs
``cpu_steps`` steps of each sampler and extrapolates linearly (``extrapolated: true``), since
every step costs one network evaluation of the same batch, and the network difference compares
a 20-step DDIM with a 10-step DPM-Solver++ on one phase (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from respmotion.diffusion.config import FAST_SAMPLER, DiffusionModelConfig, SamplerConfig
from respmotion.diffusion.model import LatentDiffusion
from respmotion.diffusion.sampling import sample_cycles
from respmotion.diffusion.schedulers import NoiseSchedule, make_sampler, run_sampler

LATENT_ZYX = (50, 32, 32)
RESEARCH = SamplerConfig(name="ddim", delta_t=5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_sampling(net, img, phases, sampler, device, max_steps: int | None) -> tuple[float, bool]:
    """Seconds for one sample_cycles call over ``phases`` (extrapolated from ``max_steps`` steps)."""
    full = sampler.num_steps
    extrap = max_steps is not None and max_steps < full
    if extrap:
        sampler.timesteps = sampler.timesteps[:max_steps]
    gen = torch.Generator(device=device).manual_seed(0)
    _sync(device)
    t0 = time.perf_counter()
    sample_cycles(net, img, phases, sampler, gen)
    _sync(device)
    dt = time.perf_counter() - t0
    return (dt * full / max_steps if extrap else dt), extrap


def run(device: str | torch.device = "cpu", checkpoint: str | None = None, cpu_steps: int = 3) -> dict:
    dev = torch.device(device)
    if checkpoint:
        from respmotion.diffusion.pipeline import load_diffusion

        model, _ = load_diffusion(checkpoint, dev)
    else:
        torch.manual_seed(0)
        model = LatentDiffusion(DiffusionModelConfig()).to(dev).eval()
    net = model.sampling_net(True)
    cfg = model.cfg
    sched = NoiseSchedule(cfg.schedule)
    cycle_phases = list(range(10, 100, 10)) if cfg.target == "ref" else list(range(0, 100, 10))
    raw = torch.randn((cfg.unet.image_channels, *LATENT_ZYX), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():  # the UNet's image input is the model's conditioning of the image latent
        img = model.image_condition(raw)
    max_steps = None if dev.type == "cuda" else cpu_steps
    # warm-up (cuDNN autotune, allocator)
    w = make_sampler(sched, SamplerConfig(name="ddim", steps=2))
    warm_phases = cycle_phases if dev.type == "cuda" else cycle_phases[:1]  # CPU: nothing to autotune
    sample_cycles(net, img, warm_phases, w, torch.Generator(device=dev).manual_seed(0))
    out: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch_threads": torch.get_num_threads(), "latent_dvf": [cfg.unet.dvf_channels, *LATENT_ZYX],
                 "latent_image": [cfg.unet.image_channels, *LATENT_ZYX], "unet_channels": list(cfg.unet.channels),
                 "trained_checkpoint": checkpoint, "target": cfg.target, "samplers": {}}
    for label, scfg in (("ddim_200", RESEARCH), ("dpmpp2m_20", FAST_SAMPLER)):
        per_phase, ex1 = _time_sampling(net, img, [cycle_phases[0]], make_sampler(sched, scfg), dev, max_steps)
        per_cycle, ex2 = _time_sampling(net, img, cycle_phases, make_sampler(sched, scfg), dev, max_steps)
        out["samplers"][label] = {"steps": make_sampler(sched, scfg).num_steps, "s_per_phase": round(per_phase, 3),
                                  "s_per_cycle": round(per_cycle, 3), "phases_per_cycle": len(cycle_phases),
                                  "extrapolated": ex1 or ex2}
    # fidelity on the same noise: the network (all phases of one cycle), and the exact Gaussian denoiser
    diff_phases = cycle_phases if dev.type == "cuda" else cycle_phases[4:5]
    res = {}
    for label, scfg in (("ddim_200", RESEARCH), ("dpmpp2m_20", FAST_SAMPLER)):
        if dev.type != "cuda":
            # CPU: a 20-step DDIM reference and a 10-step DPM-Solver++ keep the entry inside make bench's budget
            scfg = SamplerConfig(name=scfg.name, steps=min(make_sampler(sched, scfg).num_steps, 20 if scfg.name == "ddim" else 10))
        res[label] = sample_cycles(net, img, diff_phases, make_sampler(sched, scfg),
                                   torch.Generator(device=dev).manual_seed(7))[0].float().cpu()
    ref = res["ddim_200"]
    out["difference_network"] = {
        "phases": diff_phases,
        "ddim_reference_steps": 200 if dev.type == "cuda" else 20,
        "fast_sampler_steps": 20 if dev.type == "cuda" else 10,
        "mean_abs_over_std": round(float((res["dpmpp2m_20"] - ref).abs().mean() / ref.std()), 4),
        "max_abs_over_std": round(float((res["dpmpp2m_20"] - ref).abs().max() / ref.std()), 4),
    }

    def oracle(x, t):
        ab = sched.alpha_bar(int(t[0]))
        return math.sqrt(1 - ab) * x  # x0 ~ N(0, 1): E[eps | x_t] = sqrt(1 - ab) x_t

    x_T = torch.randn((100_000,), generator=torch.Generator().manual_seed(3))
    a = run_sampler(make_sampler(sched, RESEARCH), oracle, x_T, lambda: None)
    b = run_sampler(make_sampler(sched, FAST_SAMPLER), oracle, x_T, lambda: None)
    c = run_sampler(make_sampler(sched, SamplerConfig(name="ddim", steps=20)), oracle, x_T, lambda: None)
    out["difference_exact_gaussian_denoiser"] = {
        "dpmpp2m_20_vs_ddim_200_mean_abs": round(float((b - a).abs().mean()), 5),
        "ddim_20_vs_ddim_200_mean_abs": round(float((c - a).abs().mean()), 5),
        "std_ddim_200": round(float(a.std()), 4), "std_dpmpp2m_20": round(float(b.std()), 4),
        "std_ddim_20": round(float(c.std()), 4),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpoint", help="trained diffusion checkpoint (default: randomly initialised default UNet)")
    ap.add_argument("--cpu-steps", type=int, default=3, help="steps timed per sampler on CPU before extrapolating")
    a = ap.parse_args()
    print(json.dumps(run(a.device, a.checkpoint, a.cpu_steps), indent=2))


if __name__ == "__main__":
    main()
