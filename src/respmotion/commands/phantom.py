"""``respmotion phantom``: write a synthetic 4D-CT cohort with exact ground-truth motion."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import add_config_args, command, resolve_config, save_resolved


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write a synthetic thoracic 4D-CT cohort with known motion",
                       description=__doc__)
    p.add_argument("--out", help="output folder (cohort layout: patient/study/phase_XX.npy)")
    p.add_argument("--patients", type=int, help="number of patients")
    p.add_argument("--seed", type=int, help="cohort seed (anatomy and amplitude vary with it)")
    p.add_argument("--shape", help="volume shape z,y,x (default 50,256,256)")
    p.add_argument("--noise-hu", type=float, help="image noise standard deviation in HU")
    p.add_argument("--phase-curve",
                   help="'patient' (default): each patient breathes on its own curve; 'population': all on the "
                   "reference's curve")
    p.add_argument("--workers", type=int, help="patients written in parallel processes (default 1: on 2 cores one process "
                   "with two threads per patient is faster)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a phantom made with other settings in --out (default: refuse; same settings resume)")
    add_config_args(p)
    command(p, run)


def run(args: argparse.Namespace) -> int:
    from ..data.config import PhantomConfig
    from ..data.phantom import write_cohort

    cfg = resolve_config(PhantomConfig, args, {"out": args.out, "patients": args.patients, "seed": args.seed,
                                               "shape": args.shape, "noise_hu": args.noise_hu,
                                               "workers": args.workers, "phase_curve": args.phase_curve})
    out = Path(cfg.out)
    studies = write_cohort(out, cfg.patients, cfg.seed, cfg.shape, cfg.noise_hu, progress=True,
                           workers=cfg.workers, overwrite=args.overwrite, phase_curve=cfg.phase_curve)
    save_resolved(cfg, out, "phantom_config.yaml")
    print(json.dumps({"out": str(out), "studies": [s.key for s in studies]}))
    return 0
