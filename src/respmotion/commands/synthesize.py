"""``respmotion synthesize CT --out DIR``: a breathing 4D-CT from a static CT.

CT: a DICOM folder, a NIfTI/MHA/NRRD file, a ``phase_XX.npy`` of our layout, or a study folder
of our layout (its phase 00 is used).  Motion: none given (or ``--model default``): the population
motion prior calibrated on DIR-Lab 4D-CT landmarks, laid into the CT's own lungs (no network, no
training; docs/motion.md); ``--model DIR``: a trained model bundle (see ``respmotion train``);
``--model seed:DIR``: the research code's published checkpoints; ``--model gt`` on a phantom study
(its exact motion; for checks).

Outputs (``--formats``, comma-separated): ``nifti`` (default: phase_XX.nii.gz as int16 HU and
dvf_XX.nii.gz float32 ITK fields, one compressed copy of each, read by 3D Slicer, ITK and nibabel),
``mha`` (the same as .mha), ``dicom`` (a CT series per phase in the input's DICOM study, "Gated,
NN%", and with --structures one RTSTRUCT per phase holding every structure and its ITV),
``nifti4d`` (ct_4d.nii.gz).  Phases are warped and written one at a time.

--out is owned (owner.json): a rerun with the same settings redoes the folder (e.g. after an
interrupted run, whose half-written DICOM series are removed); other settings are refused unless
--overwrite.

Sampling (diffusion bundles): ``--sampler ddpm|ddim|dpm`` (dpm = DPM-Solver++(2M)); a sampler
other than the bundle's starts from its own defaults (ddpm: all T steps, ddim: T/5, dpm: 20);
``--steps N`` or ``--delta-t D`` (the research code's stride, T/D steps).  An impossible
combination is refused in one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..synthesis.pipeline import DEFAULT_FORMATS, FORMATS
from ..synthesis.run import SynthesizeConfig
from ._common import (
    DEVICE_HELP, THREADS_HELP, UserError, add_config_args, add_sampler_args, command, resolve_config,
    save_resolved)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthesize", help="synthesize a breathing 4D-CT from a static CT", description=__doc__)
    p.add_argument("ct", nargs="?", help="input CT (DICOM folder, .nii[.gz], .mha, .npy, or a study folder)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--model", help="trained model bundle folder, 'seed:DIR' (research-code checkpoints), 'gt' "
                   "(phantom study's exact motion); default: the DIR-Lab population motion prior (no network)")
    p.add_argument("--samples", type=int, help="number of breathing cycles to draw")
    p.add_argument("--seed", type=int, help="random seed")
    add_sampler_args(p)
    p.add_argument("--formats", help=f"comma-separated outputs from {','.join(FORMATS)} (default "
                   f"{','.join(DEFAULT_FORMATS)}: one compressed copy of every phase (int16 HU) and field)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--amplitude", type=float, help="breathing amplitude factor (1 = model's motion)")
    p.add_argument("--excursion-mm", type=float, help="target diaphragm SI excursion in mm")
    p.add_argument("--si-amplitude-mm", type=float, help="breathing amplitude: the lungs' mean superior motion "
                   "at 50 %% in mm (e.g. the mean SI landmark displacement of a 4D-CT); each sample is scaled to it")
    p.add_argument("--trace", help="CSV breathing trace (time, amplitude): writes a sequence following it")
    p.add_argument("--intensity", help="lung intensities: mass (default: the lungs' density follows their volume "
                   "change, mass kept, as in a real 4D-CT) or warp (intensities only moved)")
    p.add_argument("--input-phase", help="breathing state of the input CT: a phase percent 0, 10, ..., 90 "
                   "(default 0 = end-inhale; 50 = end-exhale) or mid (a mid-position / average CT)")
    p.add_argument("--dicom", action="store_true", default=None, help="add dicom to --formats")
    p.add_argument("--structures", nargs="+", help="RTSTRUCT file and/or mask files on the input CT")
    p.add_argument("--structure-names", nargs="+", help="structures to take from the RTSTRUCT (default: all)")
    p.add_argument("--no-render", dest="render", action="store_false", default=None, help="skip the GIFs")
    p.add_argument("--heatmap", action="store_true", default=None, help="GIFs with a magnitude heatmap, not arrows")
    p.add_argument("--fps", type=float, help="GIF frames per second")
    p.add_argument("--num-slices", type=int, help="slices per view in the GIFs")
    p.add_argument("--overwrite", action="store_true", help="take over an --out made with other settings")
    add_config_args(p)
    command(p, run)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(SynthesizeConfig, args, {
        "ct": args.ct, "out": args.out, "model": args.model, "sampler": args.sampler, "steps": args.steps,
        "delta_t": args.delta_t, "precision": args.precision, "device": args.device, "threads": args.threads,
        "trace": args.trace, "dicom": args.dicom, "structures": args.structures,
        "structure_names": args.structure_names,
        "render": args.render, "heatmap": args.heatmap, "fps": args.fps, "num_slices": args.num_slices,
        "options.samples": args.samples, "options.seed": args.seed,
        "options.formats": args.formats.split(",") if args.formats else None, "options.amplitude": args.amplitude,
        "options.excursion_mm": args.excursion_mm, "options.si_amplitude_mm": args.si_amplitude_mm,
        "options.intensity": args.intensity, "options.input_phase": args.input_phase})
    if not cfg.ct:
        raise UserError("no input CT given")
    from ..io.ownership import claim
    from ..runtime import use_threads
    from ..synthesis.run import load_inputs, output_identity, run_synthesis

    use_threads(cfg.threads)
    # settings, the CT, model, structures and trace space, before --out is claimed: a refused run (even with
    # --overwrite) leaves --out as it was
    inputs = load_inputs(cfg)
    with claim(cfg.out, "synthesize", output_identity(cfg), overwrite=args.overwrite):
        summary = run_synthesis(cfg, inputs)
        save_resolved(cfg, cfg.out)
    print(json.dumps({"out": cfg.out, "summary": str(Path(cfg.out) / "summary.json"),
                      "gifs": summary.get("gifs", [])}, indent=1))
    return 0
