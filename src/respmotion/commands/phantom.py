"""``respmotion phantom``: write a synthetic 4D-CT cohort with exact ground-truth motion."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ._common import add_config_args, command, resolve_config, save_resolved


@dataclass
class PhantomConfig:
    out: str = "out/phantom"
    patients: int = 4
    seed: int = 0
    shape: tuple[int, int, int] = (50, 256, 256)
    noise_hu: float = 10.0
    workers: int = 1  # patients written in parallel processes (each patient's phases already use threads)

    def __post_init__(self) -> None:
        if self.patients is not None and self.patients < 1:
            raise ValueError(f"patients must be >= 1, got {self.patients}")
        if self.noise_hu is not None and not self.noise_hu >= 0:
            raise ValueError(f"noise_hu must be >= 0 HU (a standard deviation), got {self.noise_hu}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write a synthetic thoracic 4D-CT cohort with known motion",
                       description=__doc__)
    p.add_argument("--out", help="output folder (cohort layout: patient/study/phase_XX.npy)")
    p.add_argument("--patients", type=int, help="number of patients")
    p.add_argument("--seed", type=int, help="cohort seed (anatomy and amplitude vary with it)")
    p.add_argument("--shape", help="volume shape z,y,x (default 50,256,256)")
    p.add_argument("--noise-hu", type=float, help="image noise standard deviation in HU")
    p.add_argument("--workers", type=int, help="patients written in parallel processes (default 1: on 2 cores one process "
                   "with two threads per patient is faster)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a phantom made with other settings in --out (default: refuse; same settings resume)")
    add_config_args(p)
    command(p, run)


def run(args: argparse.Namespace) -> int:
    from ..data.phantom import write_cohort

    cfg = resolve_config(PhantomConfig, args, {"out": args.out, "patients": args.patients, "seed": args.seed,
                                               "shape": args.shape, "noise_hu": args.noise_hu,
                                               "workers": args.workers})
    out = Path(cfg.out)
    studies = write_cohort(out, cfg.patients, cfg.seed, cfg.shape, cfg.noise_hu, progress=True,
                           workers=cfg.workers, overwrite=args.overwrite)
    save_resolved(cfg, out, "phantom_config.yaml")
    print(json.dumps({"out": str(out), "studies": [s.key for s in studies]}))
    return 0
