"""``respmotion latents``: encode a cohort with the trained autoencoders into a latent set.

Sharded by study with ``--rank/--world-size`` (or torchrun's ``RANK``/``WORLD_SIZE``), resumable
(finished studies and files are skipped), every file written atomically; see
:mod:`respmotion.diffusion.latents` for the layout and provenance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import DEVICE_HELP, add_config_args, command, resolve_config, save_resolved


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latents", help="encode CT and displacement fields into a latent set for diffusion",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="cohort folder (patient/study/phase_XX.npy layout)")
    p.add_argument("--image-ae", help="image autoencoder checkpoint (model.pt)")
    p.add_argument("--dvf-ae", help="DVF autoencoder checkpoint (model.pt)")
    p.add_argument("--out", help="latent set folder (created; rerun to resume)")
    p.add_argument("--fields", help="field sources, comma separated (default gt_ref,gt_step)")
    p.add_argument("--image-phases", choices=("reference", "all"), help="encode the phase-00 CT only (default) or all")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--rank", type=int, help="this worker's index (default: torchrun RANK or 0)")
    p.add_argument("--world-size", type=int, help="number of workers (default: torchrun WORLD_SIZE or 1)")
    add_config_args(p)
    command(p, run)


def run(args: argparse.Namespace) -> int:
    from ..diffusion.config import LatentsConfig
    from ..diffusion.latents import build_latent_set
    from ..runtime import resolve_rank
    from ._common import UserError

    cfg = resolve_config(LatentsConfig, args, {
        "data": args.data, "image_ae": args.image_ae, "dvf_ae": args.dvf_ae, "out": args.out, "fields": args.fields,
        "image_phases": args.image_phases, "device": args.device, "rank": args.rank, "world_size": args.world_size})
    for key in ("data", "image_ae", "dvf_ae", "out"):
        if not getattr(cfg, key):
            raise UserError(f"--{key.replace('_', '-')} is required")
    summary = build_latent_set(cfg.data, cfg.out, cfg.image_ae, cfg.dvf_ae, cfg.fields, cfg.image_phases,
                               cfg.device, cfg.rank, cfg.world_size, progress=True)
    rank, _ = resolve_rank(cfg.rank, cfg.world_size)
    save_resolved(cfg, Path(cfg.out), f"latents_config.rank{rank}.yaml")
    print(json.dumps(summary))
    return 0
