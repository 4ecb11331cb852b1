"""``respmotion register``: B-spline registration of the breathing phases of a cohort (training targets)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import (
    DEVICE_HELP, THREADS_HELP, UserError, add_config_args, command, resolve_config, save_resolved)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "register",
        help="register every phase to a reference phase and/or consecutive phases (B-spline FFD)",
        description="Register breathing phases (pull fields in mm on the fixed grid, stored as B-spline control "
                    "points). Sharded by --rank/--world-size or torchrun's RANK/WORLD_SIZE; finished pairs are "
                    "skipped, so a rerun resumes; pairs whose phase images or settings changed are redone. "
                    "--out is owned: another run with other settings is refused unless --overwrite.",
    )
    p.add_argument("--data", help="cohort root (patient/study/phase_XX.npy)")
    p.add_argument("--out", help="output root for <patient>/<study>/<pair>.npz + .json quality records")
    p.add_argument("--pairs", choices=("ref", "step", "both"), help="ref: every phase to --reference; "
                   "step: consecutive phases; both (default)")
    p.add_argument("--reference", type=int, help="reference phase in percent (default 0 = end-inhale)")
    p.add_argument("--rank", type=int, help="shard index (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, dest="world_size", help="number of shards (default: $WORLD_SIZE or 1)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, dest="batch_size",
                   help="pairs per batch (0: as many of a study's as fit in memory)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--overwrite", action="store_true", help="take over an --out registered with other settings "
                   "(its pairs are redone; default: refuse)")
    add_config_args(p)
    command(p, _run)


def _run(args: argparse.Namespace) -> int:
    from ..registration.config import RegisterConfig
    from ..io.layout import iter_studies
    from ..io.ownership import claim
    from ..registration.pipeline import result_settings, run_registration
    from ..runtime import resolve_rank

    flags = {k: getattr(args, k) for k in ("data", "out", "pairs", "reference", "rank", "world_size", "device",
                                           "batch_size", "threads")}
    cfg = resolve_config(RegisterConfig, args, flags)
    if not cfg.data or not cfg.out:
        raise UserError("--data and --out are required")
    if not Path(cfg.data).is_dir():
        raise UserError(f"{cfg.data}: dataset folder not found")
    if next(iter_studies(cfg.data), None) is None:
        raise UserError(f"{cfg.data}: no complete study (study.json) found")
    resolve_rank(cfg.rank, cfg.world_size)  # a bad shard is refused before --out is claimed
    # the shards of one run share --out; a run with other result settings is refused (or, with
    # --overwrite, takes over: its pairs are redone)
    with claim(cfg.out, "register", {"settings": result_settings(cfg)}, overwrite=args.overwrite, shared=True):
        save_resolved(cfg, cfg.out, name="register_config.yaml")
        summary = run_registration(cfg)
    print(json.dumps(summary))
    return 0
