"""One training step of each autoencoder at full shape and of the latent diffusion UNet: samples/s
and peak memory, as JSON.

    python -m bench.train_step [--device cpu|cuda|auto] [--shape 50,256,256] [--steps 1] [--quick]

Autoencoders: a step = forward, loss (LPE for the image AE, DVF loss + KL for the VAE), backward
and an AdamW update, batch 1, default architecture (base 96, mults [1, 2, 4], 21.6 / 21.9 M
parameters).  Diffusion: the engine's loss (:class:`respmotion.diffusion.task.DiffusionTask`:
noising, UNet, MSE), backward, AdamW and the EMA update, default UNet at the latent shape of a
50x256x256 volume (DVF 9x50x32x32, image 3x50x32x32), batch 2 (the default micro-batch).
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (after one untimed warm-up step); on
CPU the sampled peak resident size of the process during the step and its increase over the
size before the model was built (:class:`bench.common.PeakRSS`).  On CPU no warm-up step is
run (a full-shape step takes minutes on 2 cores); ``--quick`` uses 50x128x128 instead.
``run(device)`` returns the record; ``python -m bench`` runs it in its own process.
"""

from __future__ import annotations

import argparse
import gc
import json
from typing import Any, Sequence

import torch

from bench.common import PeakRSS, cuda_peak_mb, device_name, environment, reset_cuda_peak, timed

FULL_SHAPE = (50, 256, 256)
QUICK_SHAPE = (50, 128, 128)


def make_step(kind: str, shape: Sequence[int], device: str, precision: str):
    """A closure running one optimisation step of the default ``kind`` autoencoder; and its size."""
    from respmotion.models.autoencoder import build_autoencoder, default_net_config, kl_divergence
    from respmotion.models.losses import DVFLoss, LPELoss

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_autoencoder(default_net_config(kind, dropout=0.0)).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = (torch.rand(1, model.cfg.in_channels, *shape) * 2 - 1).to(dev)
    loss_fn = LPELoss() if kind == "image" else DVFLoss()
    amp = torch.bfloat16 if precision == "bf16" else None

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        recon = out.recon.float()
        if kind == "image":
            loss = loss_fn(recon, x)["loss"]
        else:
            loss = loss_fn(recon, x, kl_divergence(out.mu.float(), out.logvar.float()))["loss"]
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, sum(p.numel() for p in model.parameters())


LATENT_ZYX = (50, 32, 32)  # the default latent of a 50x256x256 volume (in-plane factor 8)


def make_diffusion_step(device: str, precision: str, batch: int = 2):
    """A closure running one optimisation step of the default latent diffusion model; and its size."""
    from respmotion.diffusion.config import DiffusionModelConfig
    from respmotion.diffusion.sampling import LatentNorm
    from respmotion.diffusion.task import DiffusionTask

    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = DiffusionModelConfig()
    ci, cd = cfg.unet.image_channels, cfg.unet.dvf_channels
    task = DiffusionTask(cfg, LatentNorm.identity(ci), LatentNorm.identity(cd), ema_decay=0.999, total_steps=10,
                         image_dev=(torch.zeros(ci, *LATENT_ZYX), torch.ones(ci)))
    model = task.build_model().to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = {"x": torch.randn(batch, cd, *LATENT_ZYX, device=dev), "image": torch.randn(batch, ci, *LATENT_ZYX, device=dev),
            "phase": torch.arange(batch, device=dev) % cfg.unet.num_phases, "key": [f"p{i}" for i in range(batch)]}
    amp = torch.bfloat16 if precision == "bf16" else None
    counter = [0]

    def step() -> float:
        counter[0] += 1
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = task.loss(model, data, counter[0])["loss"]
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, sum(p.numel() for p in model.unet.parameters())


def measure(kind: str, shape: Sequence[int], device: str, steps: int, precision: str) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    gc.collect()
    batch = 2 if kind == "diffusion" else 1
    with PeakRSS() as rss:
        if kind == "diffusion":
            step, n_params = make_diffusion_step(device, precision, batch)
        else:
            step, n_params = make_step(kind, shape, device, precision)
        if cuda:
            step()
            reset_cuda_peak(device)
        t = timed(step, device, repeats=steps)
    rec: dict[str, Any] = {"kind": kind, "params_M": round(n_params / 1e6, 2), "precision": precision,
                           "batch": batch, "shape_zyx": list(LATENT_ZYX if kind == "diffusion" else shape),
                           "seconds_per_step": t["seconds_mean"], "samples_per_s": round(batch / t["seconds_mean"], 4),
                           "timing": t, **rss.to_dict()}
    if cuda:
        rec["cuda_peak_mb"] = cuda_peak_mb(device)
    del step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rec


def run(device: str = "cpu", quick: bool = False, shape: Sequence[int] | None = None, steps: int | None = None,
        precision: str | None = None, quick_on_cpu: bool = False) -> dict[str, Any]:
    """Benchmark both autoencoders (batch 1) and the diffusion UNet (batch 2, default latent shape)
    on ``device``; returns a JSON-ready record.
    ``quick_on_cpu``: the quick shape on CPU only (``python -m bench`` uses it: the two full-shape CPU steps
    take longer than its 10-minute budget; run ``python -m bench.train_step`` for them)."""
    device = device_name(device)
    cuda = device.startswith("cuda")
    quick = quick or (quick_on_cpu and not cuda)
    shape = tuple(shape) if shape else (QUICK_SHAPE if quick else FULL_SHAPE)
    steps = steps or (3 if cuda else 1)
    if precision is None:
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    models = [measure(kind, shape, device, steps, precision) for kind in ("image", "dvf", "diffusion")]
    return {"env": environment(device), "shape_zyx": list(shape), "models": models}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    ap.add_argument("--shape", help="z,y,x (y and x divisible by 8); default 50,256,256")
    ap.add_argument("--steps", type=int, help="timed steps (default 1 on CPU, 3 on CUDA after a warm-up)")
    ap.add_argument("--quick", action="store_true", help="50x128x128 instead of the full shape")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else None
    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else [args.device]
    print(json.dumps([run(d, args.quick, shape, args.steps) for d in devices], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
