"""Landmark evaluation of synthesized motion on one CT whose landmarks are known in every phase.

The external check on real data (e.g. the POPI end-inhale CT with its 41 landmarks in all ten
phases): the motion model sees only the CT; its field of phase k moves the phase-00 landmarks
(inverse of the pull, :func:`respmotion.evaluation.landmarks.landmark_error`) and the result is
compared with the true phase-k positions, next to the "no motion" error.

``si_amplitude_mm`` gives the model the patient's breathing amplitude as a user would: one number, the
mean superior displacement of the lung at 50 % (for POPI the mean superior-inferior landmark displacement
at 50 %, 5.2 mm), applied through the amplitude control
(:func:`respmotion.synthesis.breathing.amplitude_for_superior_mean` + ``scale_motion``, invertible).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..core.ops import resample_volume
from ..io.landmarks import read_landmarks_json, read_popi_csv
from .landmarks import landmark_error


def read_phase_landmarks(path: str | Path) -> dict[int, np.ndarray]:
    """``{phase %: (N, 3) LPS mm}`` from a POPI LPS CSV or our ``landmarks.json``."""
    p = Path(path)
    if p.suffix.lower() == ".csv":
        return read_popi_csv(p)
    if p.suffix.lower() == ".json":
        return read_landmarks_json(p)
    raise ValueError(f"{p}: unknown landmark format (use the POPI LPS .csv or landmarks.json)")


def evaluate_ct_landmarks(ct_path: str | Path, landmarks_path: str | Path, model, out: str | Path,
                          samples: int = 1, seed: int = 0, si_amplitude_mm: float | None = None) -> dict:
    from ..data.importer import import_ct
    from .report import write_report

    t0 = time.perf_counter()
    ct = import_ct(ct_path)
    lms = read_phase_landmarks(landmarks_path)
    if 0 not in lms:
        raise ValueError(f"{landmarks_path}: no landmarks for the reference phase 0 %")
    model_ct = resample_volume(ct, model.shape) if ct.geometry.shape != tuple(model.shape) else ct
    cycles = model.generate(model_ct, samples, seed)
    factors = []
    if si_amplitude_mm is not None:
        from ..anatomy import lung_mask
        from ..synthesis.breathing import scale_to_superior_mean

        cycles, factors = scale_to_superior_mean(cycles, lung_mask(model_ct.array), float(si_amplitude_mm))
    per_phase: dict[str, dict] = {}
    for k in sorted(lms):
        if k == 0:
            continue
        none = landmark_error(None, lms[0], lms[k]).summary()["all"]
        errs = [landmark_error(c[k], lms[0], lms[k]).summary()["all"] for c in cycles if k in c]
        per_phase[f"{k:02d}"] = {"no_motion": none, "model": errs[0] if errs else None,
                                 "model_samples_mean": float(np.mean([e["mean"] for e in errs])) if errs else None}
    model_means = [v["model"]["mean"] for v in per_phase.values() if v["model"]]
    report = {
        "title": f"landmarks: {Path(ct_path).name}",
        "headline": {
            "model/landmark_error_mean_mm": float(np.mean(model_means)) if model_means else None,
            "no_motion/landmark_error_mean_mm": float(np.mean([v["no_motion"]["mean"] for v in per_phase.values()])),
            "model/landmark_error_phase50_mm": per_phase.get("50", {}).get("model", {}).get("mean") if "50" in per_phase else None,
            "no_motion/landmark_error_phase50_mm": per_phase["50"]["no_motion"]["mean"] if "50" in per_phase else None,
            "n_landmarks": int(len(lms[0])),
            "si_amplitude_mm": si_amplitude_mm,
            "amplitude_factors": factors,
        },
        "landmarks": {"units": "mm", "phases": {str(int(k)): {"no_motion": {"all": v["no_motion"]},
                                                               **({"field": {"all": v["model"]}} if v["model"] else {})}
                                                 for k, v in per_phase.items()}},
        "per_phase": per_phase,
        "seconds": time.perf_counter() - t0,
    }
    write_report(out, report)
    return report


def main(argv=None) -> int:
    """``python -m respmotion.evaluation.ct_landmarks --ct CT --landmarks FILE --out DIR [--si-amplitude-mm A]``:
    the landmark evaluation of the shipped population prior (the default motion model, no network); prints the
    headline and the per-phase table (model / no motion, mm)."""
    import argparse
    import json

    from ..models.anatomical_prior import PriorMotion

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--ct", required=True)
    ap.add_argument("--landmarks", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--si-amplitude-mm", type=float, default=None)
    args = ap.parse_args(argv)
    rep = evaluate_ct_landmarks(args.ct, args.landmarks, PriorMotion(), args.out, si_amplitude_mm=args.si_amplitude_mm)
    print(json.dumps(rep["headline"], indent=1))
    pp = rep["per_phase"]
    print("phase     " + " ".join(f"{k:>5}" for k in pp))
    print("model     " + " ".join(f"{v['model']['mean']:5.2f}" for v in pp.values()))
    print("no motion " + " ".join(f"{v['no_motion']['mean']:5.2f}" for v in pp.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
