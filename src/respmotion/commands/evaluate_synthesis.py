"""``respmotion evaluate synthesis``: motion of a model on held-out studies, or on one CT with landmarks.

Cohort mode (``--data DIR``): every study of the chosen patients (default: the test split with the
training split's seed) is synthesized from its phase 00 and compared with ground truth (phantom)
and with the zero and population-mean baselines; writes ``report.json``, ``summary.png``,
``summary.html``.  Landmark mode (``--ct CT --landmarks FILE``): synthesize from the CT and report
the landmark error per phase next to "no motion" (e.g. POPI: reference landmarks at 00 %).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluation.config import EvaluateSynthesisConfig
from ._common import (
    DEVICE_HELP, UserError, add_config_args, add_sampler_args, command, resolve_config, save_resolved)


def add_parser(targets: argparse._SubParsersAction) -> None:
    p = targets.add_parser("synthesis", help="motion metrics of synthesized 4D-CTs", description=__doc__)
    p.add_argument("--data", help="cohort folder (phantom or prepared)")
    p.add_argument("--ct", help="one CT (DICOM folder, NIfTI, MHA) for landmark mode")
    p.add_argument("--landmarks", help="landmarks of every phase (POPI CSV, or landmarks.json)")
    p.add_argument("--model", help="model bundle folder, or 'gt' (phantom ground truth)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--patients", nargs="+", help="patients to evaluate (default: the test split)")
    p.add_argument("--split", choices=("train", "val", "test"), help="split to evaluate")
    p.add_argument("--samples", type=int, help="samples per study")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help=DEVICE_HELP)
    add_sampler_args(p)
    add_config_args(p)
    command(p, run)


def _motion(cfg: EvaluateSynthesisConfig, study):
    from ..synthesis.run import SynthesizeConfig, load_motion

    return load_motion(SynthesizeConfig(ct=str(study.path) if study else cfg.ct, model=cfg.model, device=cfg.device,
                                        sampler=cfg.sampler, steps=cfg.steps, delta_t=cfg.delta_t,
                                        precision=cfg.precision), study)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(EvaluateSynthesisConfig, args, {
        "data": args.data, "ct": args.ct, "landmarks": args.landmarks, "model": args.model, "out": args.out,
        "patients": args.patients, "split": args.split, "samples": args.samples, "seed": args.seed,
        "device": args.device, "sampler": args.sampler, "steps": args.steps,
        "delta_t": args.delta_t, "precision": args.precision})
    if not cfg.model:
        raise UserError("no motion model given (--model BUNDLE_DIR or --model gt)")
    out = Path(cfg.out)
    if cfg.landmarks:
        from ..evaluation.ct_landmarks import evaluate_ct_landmarks

        if not cfg.ct:
            raise UserError("--landmarks needs --ct")
        report = evaluate_ct_landmarks(cfg.ct, cfg.landmarks, _motion(cfg, None), out, cfg.samples, cfg.seed)
        head = report["headline"]
    else:
        if not cfg.data:
            raise UserError("give --data DIR (cohort mode) or --ct CT --landmarks FILE")
        from ..evaluation.synthesis_eval import run_evaluation
        from ..io.layout import iter_studies

        studies = list(iter_studies(cfg.data))
        if not studies:
            raise UserError(f"{cfg.data}: no complete studies")
        split = cfg.patient_split.cut([s.patient for s in studies])
        chosen = set(cfg.patients) if cfg.patients else set(split.get(cfg.split))
        unknown = chosen - {s.patient for s in studies}
        if unknown:
            raise UserError(f"{cfg.data}: no patient {sorted(unknown)[0]!r}")
        test = [s for s in studies if s.patient in chosen]
        train = [s for s in split.studies(cfg.data, "train") if s.patient not in chosen]
        model = (lambda sd: _motion(cfg, sd)) if cfg.model == "gt" else _motion(cfg, None)
        report = run_evaluation(test, model, train, out, cfg.samples, cfg.seed)
        head = report["headline"]
    save_resolved(cfg, out)
    print(json.dumps(head, indent=1))
    print(f"wrote {out / 'report.json'}, {out / 'summary.png'}, {out / 'summary.html'}")
    return 0
