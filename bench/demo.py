"""The demo as a benchmark: wall time of its stages and the held-out scores of its model, over seeds and cohort sizes.

    python -m bench.demo [--seeds 0,1,2] [--patients 48] [--threads 2] [--out-root /tmp/bench-demo] [--record FILE]
    python -m bench.demo --existing DIR [DIR ...] [--record FILE]     # summarise demo folders already run
    python -m bench.demo --seeds 0,1,2 --patients 24,48,96 --heldout COHORT   # learning curve on one fixed held-out set

Each run is ``respmotion demo --out <out-root>/<label> seed=S patients=N threads=T`` in this process (the same
code path as ``make demo``).  The JSON record holds the command, the code commit, the machine
(:func:`bench.common.environment`) and per run: the stage seconds and their sum, the headline (lung DVF error of
one sample, of the K-sample mean, energy score, spread; population-mean field; no motion; landmarks) and the
per-phase table, and the acceptance checks of the learned model against the population-mean field:

* ``mean_vs_population`` = K-sample mean error / population-mean error (<= 0.8 wanted);
* ``every_phase`` = the K-sample mean is at most the population mean's error at every phase 10..90;
* ``energy_vs_population`` = energy score / population-mean error (<= 0.85; the mean field is a point forecast,
  its energy score is its error);
* ``single_below_population`` = one sample errs less than the population-mean field;
* ``pipeline_s`` = the stages' seconds (<= 300 on 2 idle CPU cores).

The per-phase table also holds the model's motion prior without the network and an amplitude oracle
(:func:`amplitude_oracle`): where the oracle loses to the population-mean field, no model reading the amplitude from
the CT can win there on these held-out patients (their phase timing is not in their CTs).

Over several runs the record adds the mean and spread (min, max) of each headline number.  Timings are only
comparable on one machine in one state: the record carries the load average.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import commit, emit, environment

HEADLINE = {"one_sample_mm": "model/dvf_error_lung_mean_mm", "k_mean_mm": "model_mean/dvf_error_lung_mean_mm",
            "energy_score_mm": "model/energy_score_mm", "spread_mm": "model/spread_mm",
            "model_prior_mm": "model_prior/dvf_error_lung_mean_mm",
            "population_mean_mm": "population_mean/dvf_error_lung_mean_mm", "no_motion_mm": "zero/dvf_error_lung_mean_mm",
            "landmarks_one_sample_mm": "model/landmark_error_mean_mm",
            "landmarks_k_mean_mm": "model_mean/landmark_error_mean_mm",
            "landmarks_population_mean_mm": "population_mean/landmark_error_mean_mm"}


def summarise(out: Path) -> dict[str, Any]:
    """One demo folder's record (reads ``demo_summary.json``, ``demo_config.yaml`` and the evaluation report)."""
    import yaml

    summary = json.loads((out / "demo_summary.json").read_text())
    cfg = yaml.safe_load((out / "demo_config.yaml").read_text())
    head = summary["headline"]
    table = summary.get("generator_per_phase") or {}
    rec: dict[str, Any] = {"out": str(out), "seed": cfg.get("seed"), "patients": cfg.get("patients"),
                           "threads": cfg.get("threads"), "stages_s": summary["seconds"],
                           "pipeline_s": round(sum(summary["seconds"].values()), 1),
                           "headline": {k: head.get(v) for k, v in HEADLINE.items()}, "per_phase": table}
    if (out / "runs" / "autoencoder_dvf" / "split.json").is_file():  # a finished demo (its cohort and split)
        rec["per_phase"]["amplitude oracle (true amplitude, population timing)"] = amplitude_oracle(out)
    h = rec["headline"]
    k_mean, pop = table.get("model, mean of K samples", {}), table.get("population-mean field", {})
    if h["k_mean_mm"] is not None and h["population_mean_mm"]:
        rec["checks"] = {
            "mean_vs_population": round(h["k_mean_mm"] / h["population_mean_mm"], 3),
            "every_phase": all(k_mean[p] <= pop[p] for p in pop) if k_mean else None,
            "energy_vs_population": round(h["energy_score_mm"] / h["population_mean_mm"], 3),
            "single_below_population": h["one_sample_mm"] < h["population_mean_mm"]}
    return rec


def on_cohort(out: Path, cohort: Path, samples: int = 8) -> dict[str, Any]:
    """A demo run's model on every study of another cohort (a fixed held-out set, e.g. for a learning curve over
    cohort sizes): the headline of :func:`respmotion.evaluation.synthesis_eval.run_evaluation` with ``samples``
    cycles a study; the population mean is the run's own training patients'."""
    import yaml

    from respmotion.evaluation.synthesis_eval import run_evaluation
    from respmotion.io.layout import iter_studies
    from respmotion.synthesis.ldm import load_bundle
    from respmotion.training.splits import Split

    split = Split.from_dict(json.loads((out / "runs" / "autoencoder_dvf" / "split.json").read_text()))
    shape = tuple(yaml.safe_load((out / "demo_config.yaml").read_text())["shape"])
    model = load_bundle(str(out / "runs" / "diffusion" / "model.pt"), shape=shape)
    report = run_evaluation(list(iter_studies(cohort)), model, split.studies(out / "data", "train"),
                            out / f"evaluation_on_{cohort.name}", samples=samples)
    head = report["headline"]
    return {"cohort": str(cohort), "train_patients": len(split.train), **{k: head.get(v) for k, v in HEADLINE.items()}}


def amplitude_oracle(out: Path) -> dict[str, float]:
    """Lung DVF error per phase (mm, mean over the run's held-out patients) of the training patients' mean field
    scaled by each held-out patient's *true* amplitude (the least-squares gain of its own cycle onto the mean
    cycle): the best any model that reads only the amplitude from a CT can do on average; the phase timing stays
    the population's.  Where this oracle loses to the unscaled mean field at a phase, so must such a model."""
    import numpy as np

    from bench.heldout_draws import amplitude_scaled, phase_errors
    from respmotion.io.atomic import read_npy
    from respmotion.io.layout import PHASES
    from respmotion.training.splits import Split

    split = Split.from_dict(json.loads((out / "runs" / "autoencoder_dvf" / "split.json").read_text()))
    moving = PHASES[1:]
    load = lambda study: np.stack([study.load_gt("ref", k).array for k in moving])  # noqa: E731
    train = split.studies(out / "data", "train")
    mean = np.mean([load(sd) for sd in train], axis=0)
    per = np.zeros(len(moving))
    test = split.studies(out / "data", "test")
    for sd in test:
        truth = load(sd)
        lungs = np.stack([read_npy(sd.mask_path("lung", k)) > 0 for k in moving])
        per += phase_errors(amplitude_scaled(mean, truth), truth, lungs) / len(test)
    return {f"{k:02d}": round(float(v), 3) for k, v in zip(moving, per)}


def spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, min and max over the runs of every headline number and of the pipeline seconds."""
    out = {}
    for key in [*HEADLINE, "pipeline_s"]:
        vals = [r["headline"][key] if key in HEADLINE else r[key] for r in runs]
        vals = [v for v in vals if v is not None]
        if vals:
            out[key] = {"mean": round(sum(vals) / len(vals), 3), "min": round(min(vals), 3), "max": round(max(vals), 3)}
    return out


def run_demo(out: Path, seed: int, patients: int, threads: int) -> dict[str, Any]:
    """``respmotion demo`` (in process) into ``out``; returns :func:`summarise` of it."""
    from respmotion.commands.demo import run
    from respmotion.cli import build_parser

    args = build_parser().parse_args(["demo", "--out", str(out), "--patients", str(patients), f"seed={seed}",
                                      f"threads={threads}"])
    run(args)
    return summarise(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="comma-separated demo seeds (cohort, split and training)")
    ap.add_argument("--patients", default="48", help="comma-separated cohort sizes (a learning curve)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-root", default="/tmp/bench-demo")
    ap.add_argument("--existing", nargs="+", help="summarise these demo folders instead of running")
    ap.add_argument("--record", help="also write the JSON record to this file")
    ap.add_argument("--heldout", help="also evaluate every run's model on this cohort (one fixed held-out set)")
    ap.add_argument("--note", default="", help="a line kept in the record (e.g. which code ran --existing runs)")
    args = ap.parse_args(argv)
    record: dict[str, Any] = {"benchmark": "demo", "command": "python -m bench.demo " + " ".join(sys.argv[1:]),
                              "commit": commit(), "machine": environment("cpu")}
    if args.note:
        record["note"] = args.note
    if args.existing:
        runs = [summarise(Path(d)) for d in args.existing]
    else:
        runs = [run_demo(Path(args.out_root) / f"s{s}_p{n}_t{args.threads}", int(s), int(n), args.threads)
                for s in args.seeds.split(",") for n in args.patients.split(",")]
    if args.heldout:
        for r in runs:
            r["on_heldout_cohort"] = on_cohort(Path(r["out"]), Path(args.heldout))
    record["runs"] = runs
    if len(runs) > 1:
        record["over_runs"] = spread(runs)
    emit(record, args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
