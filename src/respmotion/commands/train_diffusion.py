"""``respmotion train diffusion``: the phase-conditioned latent diffusion model on the shared engine.

Run under ``torchrun --nproc_per_node=N`` for DDP.  ``--resume RUN_OR_CKPT`` continues a run
exactly; ``--init CKPT`` warm-starts from other weights (that run's config is kept as
``prev_config.yaml``).  Every other setting is a ``key=value`` override of
:class:`respmotion.diffusion.train.DiffusionRunConfig`, e.g. ``model.target=step
model.unet.channels=[64,128,256] train.steps=20000 sampler.name=dpmpp2m sampler.steps=20``.
"""

from __future__ import annotations

import argparse
import json

from ._common import add_config_args, command, resolve_config


def add_parser(train_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``diffusion`` under the ``train`` command's subparsers."""
    p = train_sub.add_parser("diffusion", help="train the latent diffusion model", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", help="latent set folder (respmotion latents --out)")
    p.add_argument("--target", choices=("ref", "step"), help="ref: phase vs 00 (default); step: consecutive phases")
    p.add_argument("--out", help="runs folder (a run goes to OUT/diffusion/<timestamp>/)")
    p.add_argument("--run-dir", help="explicit run folder")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp2m"), help="default sampler stored with the model")
    p.add_argument("--delta-t", type=int, help="DDIM timestep stride (research default 5 -> 200 steps)")
    p.add_argument("--sampling-steps", type=int, help="sampler steps (overrides --delta-t)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", metavar="RUN_OR_CKPT", help="continue a run (folder or <step>.pt)")
    g.add_argument("--init", metavar="CKPT", help="warm start from these weights")
    add_config_args(p)
    command(p, run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..diffusion.train import DiffusionRunConfig, train_diffusion

    cfg = resolve_config(DiffusionRunConfig, args, {
        "data.latents": args.latents, "model.target": args.target, "out": args.out, "run_dir": args.run_dir,
        "train.steps": args.steps, "train.device": args.device, "sampler.name": args.sampler,
        "sampler.delta_t": args.delta_t, "sampler.steps": args.sampling_steps})
    res = train_diffusion(cfg, resume=args.resume, init=args.init)
    print(json.dumps({"run_dir": str(res.run_dir), "step": res.step, "model": str(res.model_path) if res.model_path else None,
                      "last_checkpoint": str(res.last_checkpoint) if res.last_checkpoint else None}))
    return 0
