"""How often a small held-out set makes a better-on-average predictor lose to the population mean at some phase.

The demo holds out 5 patients and checks, phase by phase, that the model's K-sample mean errs no more than the
training patients' mean field.  Phase timing is not in a CT (each phantom patient draws its own end-exhale phase
and curve exponent), so at the phases next to end-inhale (10, 20, 80, 90 %) a CT-reading model and the mean field
differ by a few tenths of a millimetre, and which one wins depends on whether the held-out patients happen to
breathe early or late.  This benchmark redraws the split of one demo cohort many times (same train and test sizes
as the run's ``split.json``) and counts, per phase, how often each predictor errs more than the mean field of that
draw's training patients:

* ``amplitude oracle``: the mean field scaled by each held-out patient's *true* amplitude (least-squares gain of
  its cycle onto the mean cycle; :func:`bench.demo.amplitude_oracle`): perfect amplitude, population timing;
* ``regressed prior``: :class:`respmotion.models.prior.MotionPrior` in mode ``regressed`` fitted on the draw's
  training patients (what the demo's network starts from), on their ground-truth fields as the demo trains.

Usage (a demo folder with ground truth, e.g. ``respmotion demo --out DIR``)::

    python -m bench.heldout_draws DIR [DIR ...] [--draws 200] [--seed 0] [--record FILE]

The record holds, per folder and predictor, the share of draws that lose at each phase and at >= 1 phase, and the
run's own split's per-phase result.  Draws only repartition patients; nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import commit, emit, environment

PREDICTORS = ("amplitude oracle", "regressed prior")


def _cohort(out: Path) -> tuple[list[str], dict[str, int], np.ndarray, np.ndarray, np.ndarray]:
    """Patients of the run's split, its part sizes, ground-truth fields ``(P, 9, 3, Z, Y, X)`` mm, lung masks
    ``(P, 9, Z, Y, X)`` of each moving phase and lung features ``(P, F)`` of each reference CT."""
    from respmotion.anatomy.features import lung_features
    from respmotion.io.atomic import read_npy
    from respmotion.io.layout import PHASES
    from respmotion.training.splits import Split

    split = Split.from_dict(json.loads((out / "runs" / "autoencoder_dvf" / "split.json").read_text()))
    sizes = {name: len(split.get(name)) for name in ("train", "val", "test")}
    studies = [sd for name in ("train", "val", "test") for sd in split.studies(out / "data", name)]
    moving = PHASES[1:]
    fields = np.stack([np.stack([sd.load_gt("ref", k).array for k in moving]) for sd in studies]).astype(np.float32)
    lungs = np.stack([np.stack([read_npy(sd.mask_path("lung", k)) > 0 for k in moving]) for sd in studies])
    feats = []
    for sd in studies:
        ct = sd.load_phase(0)
        feats.append(lung_features(ct.array, ct.geometry.spacing))
    return [sd.key for sd in studies], sizes, fields, lungs, np.stack(feats)


def phase_errors(pred: np.ndarray, truth: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Per-phase mean lung DVF error (mm) of ``pred`` vs ``truth``, both ``(9, 3, Z, Y, X)``, in ``lungs``
    ``(9, Z, Y, X)``."""
    return np.array([np.linalg.norm(pred[i] - truth[i], axis=0)[lungs[i]].mean() for i in range(len(truth))])


def amplitude_scaled(mean: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The amplitude oracle's cycle: ``mean`` ``(9, 3, Z, Y, X)`` mm times the least-squares gain of ``truth``'s
    cycle onto it (the patient's true amplitude, the population's timing)."""
    return float((truth * mean).sum() / (mean * mean).sum()) * mean


def score_split(train: np.ndarray, test: np.ndarray, keys: list[str], fields: np.ndarray, lungs: np.ndarray,
                feats: np.ndarray) -> dict[str, np.ndarray]:
    """Per-phase error (mm, mean over the ``test`` patients) of the population mean field and of
    :data:`PREDICTORS`, all fitted on the ``train`` patients (index arrays into the cohort)."""
    from respmotion.anatomy.features import LUNG_FEATURES
    from respmotion.io.layout import PHASES
    from respmotion.models.prior import MotionPrior

    ids = [f"ref_{k:02d}" for k in PHASES[1:]]
    mean = fields[train].mean(axis=0)
    items = lambda: ((fid, fields[p, i], keys[p]) for p in train for i, fid in enumerate(ids))  # noqa: E731
    prior = MotionPrior.from_fields(items, mode="regressed", features={keys[p]: feats[p] for p in train},
                                    feature_names=LUNG_FEATURES)
    out = {name: np.zeros(len(ids)) for name in ("population mean", *PREDICTORS)}
    for p in test:
        out["population mean"] += phase_errors(mean, fields[p], lungs[p]) / len(test)
        out["amplitude oracle"] += phase_errors(amplitude_scaled(mean, fields[p]), fields[p], lungs[p]) / len(test)
        out["regressed prior"] += phase_errors(np.stack([prior.field(f, feats[p]) for f in ids]), fields[p],
                                               lungs[p]) / len(test)
    return out


def run(out: Path, draws: int, seed: int) -> dict[str, Any]:
    """Loss shares over ``draws`` random splits of the run's cohort, and the run's own split's errors."""
    from respmotion.io.layout import PHASES

    keys, sizes, fields, lungs, feats = _cohort(out)
    n_train, n_test = sizes["train"], sizes["test"]
    own = score_split(np.arange(n_train), np.arange(len(keys) - n_test, len(keys)), keys, fields, lungs, feats)
    rng = np.random.default_rng(seed)
    loses = {name: np.zeros(len(PHASES) - 1) for name in PREDICTORS}
    any_phase = dict.fromkeys(PREDICTORS, 0)
    for _ in range(draws):
        perm = rng.permutation(len(keys))
        errs = score_split(perm[:n_train], perm[-n_test:], keys, fields, lungs, feats)
        for name in PREDICTORS:
            lost = errs[name] > errs["population mean"]
            loses[name] += lost
            any_phase[name] += bool(lost.any())
    phases = [f"{k:02d}" for k in PHASES[1:]]
    return {"out": str(out), "patients": len(keys), "train": n_train, "test": n_test, "draws": draws,
            "share_losing_at_phase": {n: dict(zip(phases, np.round(v / draws, 3).tolist())) for n, v in loses.items()},
            "share_losing_at_any_phase": {n: round(v / draws, 3) for n, v in any_phase.items()},
            "mean_error_over_phases_mm": {n: round(float(v.mean()), 3) for n, v in own.items()},
            "own_split_mm": {n: dict(zip(phases, np.round(v, 3).tolist())) for n, v in own.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="demo folders (respmotion demo --out DIR)")
    ap.add_argument("--draws", type=int, default=200, help="random splits per folder")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draws")
    ap.add_argument("--record", help="also write the JSON record to this file")
    args = ap.parse_args(argv)
    if args.draws < 1:
        ap.error(f"--draws must be at least 1, got {args.draws}")
    record = {"benchmark": "heldout_draws", "command": "python -m bench.heldout_draws " + " ".join(sys.argv[1:]),
              "commit": commit(), "machine": environment("cpu"),
              "runs": [run(Path(d), args.draws, args.seed) for d in args.runs]}
    emit(record, args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
