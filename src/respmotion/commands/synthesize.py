"""``respmotion synthesize CT --out DIR``: a breathing 4D-CT from a static CT.

CT: a DICOM folder, a NIfTI/MHA/NRRD file, a ``phase_XX.npy`` of our layout, or a study folder
of our layout (its phase 00 is used).  Motion: ``--model DIR`` (a trained model bundle, see
``respmotion train``), or ``--model gt`` on a phantom study (its exact motion; for checks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..synthesis.run import SynthesizeConfig
from ._common import UserError, add_config_args, command, resolve_config, save_resolved


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthesize", help="synthesize a breathing 4D-CT from a static CT", description=__doc__)
    p.add_argument("ct", nargs="?", help="input CT (DICOM folder, .nii[.gz], .mha, .npy, or a study folder)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--model", help="trained model bundle folder, or 'gt' (phantom study's exact motion)")
    p.add_argument("--samples", type=int, help="number of breathing cycles to draw")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm", "dpmpp2m"], help="diffusion sampler")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--amplitude", type=float, help="breathing amplitude factor (1 = model's motion)")
    p.add_argument("--excursion-mm", type=float, help="target diaphragm SI excursion in mm")
    p.add_argument("--trace", help="CSV breathing trace (time, amplitude): writes a sequence following it")
    p.add_argument("--dicom", action="store_true", default=None, help="also write each phase as a DICOM CT series")
    p.add_argument("--structures", nargs="+", help="RTSTRUCT file and/or mask files on the input CT")
    p.add_argument("--structure-names", nargs="+", help="structures to take from the RTSTRUCT (default: all)")
    p.add_argument("--no-render", dest="render", action="store_false", default=None, help="skip the GIFs")
    p.add_argument("--heatmap", action="store_true", default=None, help="GIFs with a magnitude heatmap, not arrows")
    p.add_argument("--fps", type=float, help="GIF frames per second")
    p.add_argument("--num-slices", type=int, help="slices per view in the GIFs")
    add_config_args(p)
    command(p, run)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(SynthesizeConfig, args, {
        "ct": args.ct, "out": args.out, "model": args.model, "samples": args.samples, "seed": args.seed,
        "sampler": args.sampler, "steps": args.steps, "device": args.device, "amplitude": args.amplitude,
        "excursion_mm": args.excursion_mm, "trace": args.trace, "dicom": args.dicom, "structures": args.structures,
        "structure_names": args.structure_names, "render": args.render, "heatmap": args.heatmap, "fps": args.fps,
        "num_slices": args.num_slices})
    if not cfg.ct:
        raise UserError("no input CT given")
    if not cfg.model:
        raise UserError("no motion model given (--model BUNDLE_DIR, or --model gt on a phantom study)")
    from ..synthesis.run import run_synthesis

    summary = run_synthesis(cfg)
    save_resolved(cfg, cfg.out)
    print(json.dumps({"out": cfg.out, "summary": str(Path(cfg.out) / "summary.json"),
                      "gifs": summary.get("gifs", [])}, indent=1))
    return 0
