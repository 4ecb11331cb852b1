"""``respmotion demo``: the whole pipeline on a small synthetic cohort (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import json

from ._common import add_config_args, command, resolve_config


def register(sub: argparse._SubParsersAction) -> None:
    from ..demo import DemoConfig  # noqa: F401  (documented config)

    p = sub.add_parser("demo", help="run every stage on a small phantom cohort and report",
                       description="phantom -> registration -> autoencoders -> latents -> diffusion -> synthesis "
                                   "of a held-out patient -> GIFs -> evaluation report. Config: respmotion.demo.DemoConfig.")
    p.add_argument("--out", help="output folder (default out/demo)")
    p.add_argument("--patients", type=int, help="phantom patients (default 48)")
    p.add_argument("--shape", help="volume shape z,y,x (default 16,64,64)")
    p.add_argument("--device", help="cpu (default: the demo is sized for a laptop's CPU) or cuda")
    add_config_args(p)
    command(p, run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run_demo

    cfg = resolve_config(DemoConfig, args, {"out": args.out, "patients": args.patients, "shape": args.shape,
                                            "device": args.device})
    result = run_demo(cfg)
    print(json.dumps(result, indent=1))
    gen = result.get("generator_per_phase")
    if gen:
        phases = list(next(iter(gen.values())))
        print(f"\nLung DVF error on the held-out patients, mm (phases {phases[0]}..{phases[-1]} %, then their mean):")
        for name, row in gen.items():
            vals = [row[p] for p in phases]
            print(f"  {name:28s}" + " ".join(f"{v:5.2f}" for v in vals) + f" | {sum(vals) / len(vals):.3f}")
    o = result["outputs"]
    print(f"\nDemo outputs in {cfg.out}:\n  GIFs:      {o['synthesis']}/gifs\n  4D-CT:     {o['synthesis']}/sample_00"
          f"\n  report:    {o['report']}\n  summary:   {o['summary_html']}")
    return 0
