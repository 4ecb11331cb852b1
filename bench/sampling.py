"""Sampling cost and fidelity: 200-step DDIM (research default) vs the fast sampler.

    python -m bench.sampling [--device cuda] [--checkpoint CKPT] [--demo-dir out/demo]

Prints JSON:

* ``samplers``: seconds per phase (batch of 1) and per cycle (all phases of one draw in one batch:
  9 sampled phases in ref mode, 10 transitions in step mode) at the default latent shape (DVF
  9x50x32x32, image 3x50x32x32) with the default UNet (random weights, or ``--checkpoint``), for
  DDIM with delta_t = 5 (200 steps) and DPM-Solver++(2M) with 20 steps.  On CUDA each figure is a
  full sampling run.  On CPU a 200-step cycle takes about two hours on 2 cores, so the times are
  composed from measurements (``"method": "composed"``): every sampler step is one network
  evaluation of the same batch plus the sampler's update, so ``s = steps x (one network
  evaluation at batch 1 / at the cycle's batch) + (the sampler's update arithmetic over all its
  steps, measured with a zero-cost model)``.
* ``difference_trained_demo``: the DVFs (mm, lungs) the two samplers generate from the same noise
  with the model ``make demo`` trained, on its held-out phantom CTs, and each one's error against
  the phantom's true motion (skipped with a reason when ``--demo-dir`` holds no demo output).
* ``difference_network``: with ``--checkpoint``, the two samplers' latents on the same noise
  (CPU: 20-step DDIM vs 10-step DPM-Solver++ on one phase).  Not measured for random weights:
  MONAI zero-initialises the UNet's output layer, so every sampler returns the same field.
* ``difference_exact_denoisers``: pure solver error, both samplers driven by exact denoisers
  (a unit Gaussian; a mixture of points), see :func:`exact_denoiser_fidelity`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from respmotion.diffusion.config import FAST_SAMPLER, DiffusionModelConfig, SamplerConfig
from respmotion.diffusion.model import LatentDiffusion
from respmotion.diffusion.sampling import sample_cycles
from respmotion.diffusion.schedulers import NoiseSchedule, make_sampler, run_sampler
from respmotion.diffusion.unet import phase_index

LATENT_ZYX = (50, 32, 32)
RESEARCH = SamplerConfig(name="ddim", delta_t=5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_sampling(net, img, phases, sampler, device) -> float:
    """Seconds for one full sample_cycles call over ``phases``."""
    gen = torch.Generator(device=device).manual_seed(0)
    _sync(device)
    t0 = time.perf_counter()
    sample_cycles(net, img, phases, sampler, gen)
    _sync(device)
    return time.perf_counter() - t0


def _time_eval(net, img, phases, repeats: int = 1) -> float:
    """Seconds for one network evaluation (no grad) of a batch of ``len(phases)`` latents (CPU)."""
    cd = net.cfg.dvf_channels
    x = torch.randn((len(phases), cd, *img.shape[1:]))
    t = torch.full((len(phases),), 500, dtype=torch.long)
    labels = torch.tensor([phase_index(p) for p in phases], dtype=torch.long)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x, img[None], t, labels)
            times.append(time.perf_counter() - t0)
    return min(times)


def _time_arithmetic(sampler, batch: int, latent_shape) -> float:
    """Seconds of the sampler's own update arithmetic over all its steps (a zero-cost model)."""
    x_T = torch.randn((batch, *latent_shape), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    run_sampler(sampler, lambda x, t: torch.zeros_like(x), x_T, lambda: torch.randn_like(x_T))
    return time.perf_counter() - t0


def run(device: str | torch.device = "cpu", checkpoint: str | None = None, quick: bool = False,
        demo_dir: str | None = "out/demo", latent_zyx: tuple[int, int, int] = LATENT_ZYX) -> dict:
    """The JSON record (module docstring).  ``quick`` is accepted for ``python -m bench``'s common
    interface (the CPU path is already composed); ``latent_zyx`` other than the default: smoke tests."""
    dev = torch.device(device)
    latent_zyx = tuple(latent_zyx)
    cuda = dev.type == "cuda"
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
    raw = torch.randn((cfg.unet.image_channels, *latent_zyx), generator=torch.Generator().manual_seed(1)).to(dev)
    # mid-range lung features (gas ml, mean and p90 column height mm): the timing does not depend on them
    features = torch.tensor([[2500.0, 120.0, 180.0]]) if model.anatomy is not None else None
    with torch.no_grad():  # the UNet's image input is the model's conditioning of the image latent
        img = model.condition(raw[None], features)[0]
    out: dict = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                 "torch_threads": torch.get_num_threads(), "latent_dvf": [cfg.unet.dvf_channels, *latent_zyx],
                 "latent_image": [cfg.unet.image_channels, *latent_zyx], "unet_channels": list(cfg.unet.channels),
                 "unet_params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
                 "trained_checkpoint": checkpoint, "target": cfg.target, "phases_per_cycle": len(cycle_phases),
                 "method": "measured" if cuda else "composed", "samplers": {}}
    samplers = {"ddim_200": RESEARCH, "dpmpp2m_20": FAST_SAMPLER}
    if cuda:
        # warm-up (cuDNN autotune, allocator), then full runs
        sample_cycles(net, img, cycle_phases, make_sampler(sched, SamplerConfig(name="ddim", steps=2)),
                      torch.Generator(device=dev).manual_seed(0))
        for label, scfg in samplers.items():
            out["samplers"][label] = {
                "steps": make_sampler(sched, scfg).num_steps,
                "s_per_phase": round(_time_sampling(net, img, cycle_phases[:1], make_sampler(sched, scfg), dev), 3),
                "s_per_cycle": round(_time_sampling(net, img, cycle_phases, make_sampler(sched, scfg), dev), 3)}
    else:
        _time_eval(net, img, cycle_phases[:1])  # warm-up
        eval_phase = _time_eval(net, img, cycle_phases[:1], repeats=2)
        eval_cycle = _time_eval(net, img, cycle_phases)
        out["network_eval_s"] = {"batch_1": round(eval_phase, 3), f"batch_{len(cycle_phases)}": round(eval_cycle, 3)}
        lat = (cfg.unet.dvf_channels, *latent_zyx)
        for label, scfg in samplers.items():
            n = make_sampler(sched, scfg).num_steps
            ar_phase = _time_arithmetic(make_sampler(sched, scfg), 1, lat)
            ar_cycle = _time_arithmetic(make_sampler(sched, scfg), len(cycle_phases), lat)
            out["samplers"][label] = {"steps": n, "s_per_phase": round(n * eval_phase + ar_phase, 3),
                                      "s_per_cycle": round(n * eval_cycle + ar_cycle, 3),
                                      "sampler_arithmetic_s_per_cycle": round(ar_cycle, 4)}
    fast, slow = out["samplers"]["dpmpp2m_20"], out["samplers"]["ddim_200"]
    out["speedup_fast_vs_ddim_200"] = round(slow["s_per_cycle"] / fast["s_per_cycle"], 2)

    if checkpoint:  # fidelity of the timed (trained) network on the same noise, all phases of one cycle
        diff_phases = cycle_phases if cuda else cycle_phases[4:5]
        ref_cfg, fast_cfg = (RESEARCH, FAST_SAMPLER) if cuda else (SamplerConfig(name="ddim", steps=20),
                                                                   SamplerConfig(name=FAST_SAMPLER.name, steps=10))
        res = {label: sample_cycles(net, img, diff_phases, make_sampler(sched, scfg),
                                    torch.Generator(device=dev).manual_seed(7))[0].float().cpu()
               for label, scfg in (("ref", ref_cfg), ("fast", fast_cfg))}
        ref = res["ref"]
        out["difference_network"] = {
            "phases": diff_phases, "reference": _label(sched, ref_cfg), "fast": _label(sched, fast_cfg),
            "mean_abs_over_std": round(float((res["fast"] - ref).abs().mean() / ref.std()), 4),
            "max_abs_over_std": round(float((res["fast"] - ref).abs().max() / ref.std()), 4)}
    else:
        out["difference_network"] = ("not measured: the untrained UNet's output layer is zero-initialised (MONAI), "
                                     "so every sampler returns the same field; see difference_trained_demo")
    out["difference_trained_demo"] = trained_fidelity(demo_dir, dev)
    out["difference_exact_denoisers"] = exact_denoiser_fidelity(sched)
    return out


def _label(sched: NoiseSchedule, cfg: SamplerConfig) -> str:
    return f"{cfg.name}, {make_sampler(sched, cfg).num_steps} steps"


def trained_fidelity(demo_dir: str | Path | None, device: torch.device) -> dict | str:
    """DVFs (mm) of 200-step DDIM vs the fast sampler on the same noise with the model ``make demo``
    trained, on its held-out phantom CTs; each also against the phantom's true motion (lungs)."""
    from respmotion.diffusion.pipeline import MotionGenerator
    from respmotion.evaluation import metrics as M
    from respmotion.io.layout import PHASES, StudyDir
    from respmotion.synthesis.ldm import DiffusionMotion

    root = Path(demo_dir) if demo_dir else None
    summary = root / "demo_summary.json" if root else None
    if summary is None or not summary.is_file():
        return f"skipped: no trained model ({summary or 'no --demo-dir'} not found; run `make demo` first)"
    info = json.loads(summary.read_text())
    ckpt = root / "runs" / "diffusion" / "model.pt"
    try:
        gen = MotionGenerator.from_checkpoints(ckpt, device=device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # reported in the JSON, e.g. an older demo
        return {"error": f"{ckpt}: {exc} (run `make demo` again)"}
    data = root / "data"  # the demo's layout: <out>/data/<patient>/<study>
    models = {"ddim_200": DiffusionMotion(gen, RESEARCH), "dpmpp2m_20": DiffusionMotion(gen, FAST_SAMPLER)}
    rec: dict = {"checkpoint": str(ckpt), "studies": {}}
    for key in info["held_out"]:
        study = StudyDir(data / key)
        ct = study.load_phase(0)
        fields, secs = {}, {}
        for label, m in models.items():
            t0 = time.perf_counter()
            fields[label] = m.generate(ct, samples=1, seed=11)[0]
            secs[label] = round(time.perf_counter() - t0, 3)
        diff, err = [], {label: [] for label in models}
        for k in PHASES[1:]:
            lung = np.load(study.mask_path("lung", k))
            a, b = fields["ddim_200"][k], fields["dpmpp2m_20"][k]
            diff.append(M.dvf_error(b, a, lung)["mean"])
            truth = study.load_gt("ref", k)
            for label in models:
                err[label].append(M.dvf_error(fields[label][k], truth, lung)["mean"])
        rec["studies"][key] = {
            "shape_zyx": list(ct.geometry.shape), "seconds_per_cycle": secs,
            "mean_lung_difference_mm": round(sum(diff) / len(diff), 4), "max_phase_difference_mm": round(max(diff), 4),
            "lung_error_vs_truth_mm": {label: round(sum(v) / len(v), 4) for label, v in err.items()}}
    return rec


def exact_denoiser_fidelity(sched: NoiseSchedule) -> dict:
    """Pure solver error: both samplers driven by an exact denoiser.

    * a unit Gaussian (``E[x0 | x_t] = sqrt(ab) x_t``), 100 000 scalars;
    * a mixture of 64 equally likely points (std 1) in 8 dimensions, whose exact denoiser is a
      softmax-weighted mean of the points: a sampler must land on one of them, as a trained model
      must land on plausible latents, and a coarse solver picks a different one.  (In the 460 800
      dimensions of the real latent the points are so far apart that every sampler picks the
      same one.)  Reported over 2000 draws: mean |difference|, the fraction ending nearest the
      same point as 200-step DDIM, and the mean distance to the nearest point.
    """
    def as_output(x0, x, t):
        ab = sched.alpha_bar(int(t[0]))
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        return sched.target(x0, eps, t)

    def gaussian(x, t):
        return as_output(math.sqrt(sched.alpha_bar(int(t[0]))) * x, x, t)

    gen = torch.Generator().manual_seed(5)
    points = torch.randn((64, 8), generator=gen, dtype=torch.float64)
    p2 = (points * points).sum(1)

    def mixture(x, t):
        ab = sched.alpha_bar(int(t[0]))
        a = math.sqrt(ab)
        x64 = x.double()
        logits = -((x64 * x64).sum(1, keepdim=True) - 2 * a * x64 @ points.T + ab * p2) / (2 * (1 - ab))
        x0 = torch.softmax(logits, 1) @ points
        return as_output(x0, x64, t).to(x.dtype)

    out = {}
    for name, fn, x_T in (("gaussian", gaussian, torch.randn((100_000, 1), generator=gen)),
                          ("mixture_64_points_8d", mixture, torch.randn((2000, 8), generator=gen))):
        res = {label: run_sampler(make_sampler(sched, c), fn, x_T, lambda: None)
               for label, c in (("ddim_200", RESEARCH), ("dpmpp2m_20", FAST_SAMPLER),
                                ("ddim_20", SamplerConfig(name="ddim", steps=20)))}
        ref = res["ddim_200"]
        rec = {f"{k}_vs_ddim_200_mean_abs": round(float((v - ref).abs().mean()), 5)
               for k, v in res.items() if k != "ddim_200"}
        rec.update({f"std_{k}": round(float(v.std()), 4) for k, v in res.items()})
        if name.startswith("mixture"):
            near = {k: torch.cdist(v.double(), points).argmin(1) for k, v in res.items()}
            rec.update({f"{k}_same_point_fraction": float((near[k] == near["ddim_200"]).double().mean())
                        for k in res if k != "ddim_200"})
            rec.update({f"{k}_distance_to_nearest_point": round(float(torch.cdist(v.double(), points).min(1).values.mean()), 5)
                        for k, v in res.items()})
        out[name] = rec
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpoint", help="trained diffusion checkpoint (default: randomly initialised default UNet)")
    ap.add_argument("--demo-dir", default="out/demo", help="output of `make demo` (its trained model and held-out CTs)")
    a = ap.parse_args()
    print(json.dumps(run(a.device, a.checkpoint, demo_dir=a.demo_dir), indent=2))


if __name__ == "__main__":
    main()
