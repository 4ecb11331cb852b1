"""``respmotion evaluate <target>``: metrics of trained models.

``autoencoder`` lives here; siblings (e.g. ``synthesis``) live in their own module under
:mod:`respmotion.commands` defining ``add_parser(subparsers)`` and are listed in
:data:`EVALUATE_TARGET_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib

from ._common import DEVICE_HELP, add_config_args, command, resolve_config

# modules under respmotion.commands that add a target with add_parser(subparsers), e.g. "evaluate_synthesis"
EVALUATE_TARGET_MODULES: tuple[str, ...] = ("evaluate_synthesis",)


def _evaluate_autoencoder(args: argparse.Namespace) -> int:
    from ..training.autoencoder_eval import AEEvalConfig, evaluate_autoencoder

    flags = {"checkpoint": args.checkpoint, "data_root": args.data, "split": args.split, "out": args.out,
             "device": args.device, "max_items": args.max_items}
    cfg = resolve_config(AEEvalConfig, args, flags)
    metrics, out = evaluate_autoencoder(cfg)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics["mean"].items())
    print(f"{metrics['items']} {cfg.split} items: {summary}\nwrote {out / 'metrics.json'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate trained models (autoencoder, ...)")
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    a = targets.add_parser("autoencoder", help="reconstruction metrics on the stored test split",
                           description="Image AE: PSNR, SSIM, MAE (HU). DVF AE: mean / 95th-percentile error (mm).")
    a.add_argument("--checkpoint", metavar="PATH", help="model.pt, <step>.pt or a run folder")
    a.add_argument("--data", metavar="DIR", help="cohort folder (default: the training run's)")
    a.add_argument("--split", choices=("train", "val", "test"), help="patients to evaluate (default test)")
    a.add_argument("--out", metavar="DIR", help="output folder (default <run>/eval_<split>)")
    a.add_argument("--device", help=DEVICE_HELP)
    a.add_argument("--max-items", type=int, help="evaluate at most this many items")
    add_config_args(a)
    command(a, _evaluate_autoencoder)
    for name in EVALUATE_TARGET_MODULES:
        importlib.import_module(f"respmotion.commands.{name}").add_parser(targets)
