"""``respmotion train <target>``: train a model with the shared engine.

Targets are sub-subcommands: ``autoencoder`` lives here; siblings (e.g. ``diffusion``) live in
their own module under :mod:`respmotion.commands` defining ``add_parser(subparsers)`` and are
listed in :data:`TRAIN_TARGET_MODULES`.

Multi-process (DDP): ``torchrun --standalone --nproc_per_node=N -m respmotion.cli train ...``.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from ._common import DEVICE_HELP, UserError, add_config_args, command, resolve_config

# modules under respmotion.commands that add a target with add_parser(subparsers), e.g. "train_diffusion"
TRAIN_TARGET_MODULES: tuple[str, ...] = ("train_diffusion",)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Options every training target shares (engine settings; all also settable as train.*=...)."""
    p.add_argument("--out", help="root folder of runs (a run goes to OUT/<task>/<timestamp>/)")
    p.add_argument("--run-dir", help="exact run folder instead of OUT/<task>/<timestamp>")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="micro-batch per process (train.batch_size)")
    p.add_argument("--device", help=f"{DEVICE_HELP} (train.device)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", metavar="RUN_OR_CKPT",
                   help="continue a run exactly from its newest checkpoint (or this checkpoint); "
                        "its config.yaml is the base config")
    g.add_argument("--init", metavar="CKPT", help="warm start: start a new run from these weights "
                                                  "(the old run's config is kept as prev_config.yaml)")
    add_config_args(p)


def run_flags(args: argparse.Namespace) -> dict:
    return {"out": args.out, "run_dir": args.run_dir, "train.steps": args.steps,
            "train.batch_size": args.batch_size, "train.device": args.device}


def resume_base_config(args: argparse.Namespace) -> None:
    """On ``--resume`` without ``--config``, the run's own config.yaml is the base."""
    if args.resume and not args.config:
        from ..io.checkpoint import latest_checkpoint

        cfg_file = latest_checkpoint(args.resume).parent / "config.yaml"
        if not cfg_file.exists():
            raise UserError(f"{cfg_file}: run folder has no config.yaml to resume with")
        args.config = str(cfg_file)


def _train_autoencoder(args: argparse.Namespace) -> int:
    from ..training.autoencoder import AutoencoderRunConfig, train_autoencoder
    from ..training.engine import TrainingDiverged

    resume_base_config(args)
    flags = {**run_flags(args), "kind": args.kind, "data.root": args.data}
    cfg = resolve_config(AutoencoderRunConfig, args, flags)
    try:
        result = train_autoencoder(cfg, resume=args.resume, init=args.init)
    except TrainingDiverged as exc:
        raise UserError(str(exc)) from exc
    print(f"trained {result.step} steps; run folder {result.run_dir}; model {result.model_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model (autoencoder, ...)",
                              description="Train a model with the shared engine (DDP via torchrun).")
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    a = targets.add_parser("autoencoder", help="image autoencoder or DVF VAE",
                           description="Train the image autoencoder (--kind image) or the DVF VAE (--kind dvf). "
                                       "Config: respmotion.training.autoencoder.AutoencoderRunConfig.")
    a.add_argument("--kind", choices=("image", "dvf"), help="what to compress (kind)")
    a.add_argument("--data", metavar="DIR", help="cohort folder (data.root)")
    add_run_args(a)
    command(a, _train_autoencoder)
    for name in TRAIN_TARGET_MODULES:
        importlib.import_module(f"respmotion.commands.{name}").add_parser(targets)
