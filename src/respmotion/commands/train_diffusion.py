"""``respmotion train diffusion``: the phase-conditioned latent diffusion model on the shared engine.

Run under ``torchrun --standalone --nproc_per_node=N -m respmotion.cli train diffusion ...`` for
DDP.  ``--resume RUN_OR_CKPT`` continues a run exactly (its config.yaml is the base config);
``--init CKPT`` warm-starts from other weights (that run's config is kept as
``prev_config.yaml``).  Every setting is also a ``key=value`` override of
:class:`respmotion.diffusion.train.DiffusionRunConfig`, e.g. ``model.target=step
model.unet.channels=[64,128,256] train.steps=20000 sampler.name=dpmpp2m sampler.steps=20``; ``--sampler/--sampling-steps/--delta-t``
follow :func:`respmotion.diffusion.config.choose_sampler` on top of the config's sampler.
Listed in ``TRAIN_TARGET_MODULES`` of :mod:`respmotion.commands.train`.
"""

from __future__ import annotations

import argparse
import json

from ..diffusion.config import SAMPLER_CHOICES, choose_sampler
from ._common import UserError, command, resolve_config


def add_parser(targets: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``diffusion`` under the ``train`` command's targets."""
    from .train import add_run_args

    p = targets.add_parser("diffusion", help="latent diffusion model (phase-conditioned UNet on latents)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", metavar="DIR", help="latent set folder from `respmotion latents` (data.latents)")
    p.add_argument("--target", choices=("ref", "step"),
                   help="ref: each phase relative to 00 (default); step: consecutive transitions (model.target)")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, help="default sampler stored with the model "
                   "(default: DPM-Solver++ 15 steps; another sampler starts from its own defaults)")
    p.add_argument("--delta-t", type=int, help="timestep stride of the research code: T / DELTA_T steps")
    p.add_argument("--sampling-steps", type=int, help="sampler steps")
    add_run_args(p)
    command(p, run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..diffusion.train import DiffusionRunConfig, train_diffusion
    from ..training.engine import TrainingDiverged
    from .train import resume_base_config, run_flags

    resume_base_config(args)
    cfg = resolve_config(DiffusionRunConfig, args, {
        **run_flags(args), "data.latents": args.latents, "model.target": args.target})
    # the sampler flags mean what they mean for synthesize (one rule: diffusion.config.choose_sampler)
    cfg.sampler = choose_sampler(cfg.sampler, cfg.model.schedule.num_train_timesteps, args.sampler,
                                 args.sampling_steps, args.delta_t)
    try:
        res = train_diffusion(cfg, resume=args.resume, init=args.init)
    except TrainingDiverged as exc:
        raise UserError(str(exc)) from exc
    print(json.dumps({"run_dir": str(res.run_dir), "step": res.step,
                      "model": str(res.model_path) if res.model_path else None,
                      "last_checkpoint": str(res.last_checkpoint) if res.last_checkpoint else None}))
    return 0
