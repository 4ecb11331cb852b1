"""Registration benchmark: ours vs hf-deepali FFD vs elastix vs ConvexAdam, same pairs, same run, printing JSON.

Settings are chosen on the *tuning* sets only and reported on the *held-out* set, whose phantom patients have
breathing amplitudes outside the tuning patients' range and whose pairs the tuning set lacks::

    python -m bench.registration --set tune --tune          # ours: the candidates of registration_candidates.yaml
    python -m bench.registration --set tune --tune --methods deepali-example   # the same for deepali's example
    python -m bench.registration --set heldout --methods ours,ours-pair,deepali --repeats 3   # the acceptance
    python -m bench.registration --set real                 # real-texture lung CT pair, 51 landmarks
    python -m bench.registration --set native --methods ours --pairs ref_50   # time and memory at 141x512x512
    python -m bench.registration --set phantom --seed 0     # one phantom (``--pairs``; what `python -m bench` runs)

Common flags: ``--shape 50,256,256`` (phantom grid),
``--methods ours,ours-pair,deepali,deepali-example,elastix,convexadam``, ``--threads 2``, ``--repeats 3`` (ours and
both deepali methods are timed this many times: median and spread; elastix and ConvexAdam once), ``--device cpu|cuda``.

Sets (:data:`~bench.registration_cases.SETS`): *tune* = phantom seeds 5, 6, 9, pairs ``ref_20``, ``ref_50``;
*tune_small* = the same seeds' pairs ``step_00``, ``step_60`` (small motion); *heldout* = seeds 12 and 13, pairs
``ref_20``, ``ref_50`` (reporting only; ``--tune`` runs on the tuning sets only); *real* = the small real lung CT of
``shared/data/elastix-lung-ct-small``; *native* = the phantom ``--seed``'s ``--pairs`` resampled to 141x512x512.

Per method and pair: seconds (each repeat, median, spread), lung DVF error (mean / p95 mm on the fixed phase's true
lung voxels, against the exact pull field), landmark TRE split by the in-lung flag and binned by the target
landmark's signed distance to the true lung boundary, % voxels with Jacobian determinant <= 0
(:mod:`bench.registration_metrics`).  ``acceptance`` compares ours with each deepali method run, pair by pair.
Ours registers the pairs of one patient as one batch (time per pair = batch / pairs, masks and dense fields
included).  Methods: :mod:`bench.registration_methods`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Sequence

import numpy as np
import torch

from respmotion.registration.config import FFDSettings

from .registration_candidates import SETTINGS, load_candidates
from .registration_cases import DEFAULT_PAIRS, SET_NAMES, TUNING_SETS, Case, cases_for
from .registration_methods import (METHODS, DeepaliSettings, run_anchor_deepali, run_convexadam, run_deepali,
                                   run_elastix, run_ours)
from .registration_metrics import acceptance, metrics

BASELINES = ("deepali", "deepali-example")  # what ours is accepted against
OURS = ("ours", "ours-pair")  # a patient's pairs as one batch; one pair at a time
TIMED = (*OURS, *BASELINES)  # methods timed `repeats` times


def _timing(seconds: list[float], cpu: list[float]) -> dict[str, Any]:
    """Wall seconds per pair (median, each repeat, spread) and the process's CPU seconds per pair (median over
    repeats, all threads): on a loaded machine the wall ratio of two methods drifts, the CPU one much less."""
    return {"seconds": statistics.median(seconds), "seconds_repeats": [round(t, 3) for t in seconds],
            "seconds_spread": (max(seconds) - min(seconds)) / statistics.median(seconds) if seconds else None,
            "cpu_seconds": statistics.median(cpu)}


def _run_ours(cases: Sequence[Case], device: str, repeats: int, settings: FFDSettings | None,
              batched: bool = True) -> dict[str, Any]:
    """Ours on ``cases``, one batch per group (patient), or with ``batched`` False one pair at a time; metrics of the
    last repeat, each batch's optimiser log and peak resident memory (``rss_peak_mb``)."""
    from bench.common import PeakRSS

    rec: dict[str, Any] = {"pairs": {}, "log": {}}
    groups = dict.fromkeys(c.group for c in cases) if batched else [c.name for c in cases]
    for group in groups:
        sub = [c for c in cases if (c.group if batched else c.name) == group]
        times, cpu = [], []
        for _ in range(max(1, repeats)):
            c0 = time.process_time()
            with PeakRSS() as mem:
                fields, per_pair, log = run_ours([c.fixed for c in sub], [c.moving for c in sub], sub[0].geom,
                                                 device, settings)
            times.append(per_pair)
            cpu.append((time.process_time() - c0) / len(sub))
        rec["log"][group] = {"level_seconds": [round(lv["seconds"], 2) for lv in log["levels"]],
                             "level_iterations": [lv.get("iterations") for lv in log["levels"]],
                             "repair": log.get("repair"), "pairs_in_batch": len(sub), **mem.to_dict()}
        for c, u in zip(sub, fields):
            rec["pairs"][c.name] = {**_timing(times, cpu), **metrics(u, c)}
    return rec


def _run_pairwise(method: str, cases: Sequence[Case], device: str, threads: int, repeats: int,
                  deepali_settings: DeepaliSettings | None) -> dict[str, Any]:
    """A baseline on ``cases``, one pair at a time (``TIMED`` methods ``repeats`` times; metrics of the last)."""
    def one(c: Case) -> tuple[np.ndarray, float]:
        if method == "deepali":
            return run_anchor_deepali(c.fixed, c.moving, c.geom)
        if method == "deepali-example":
            return run_deepali(c.fixed, c.moving, c.geom, device, deepali_settings)
        if method == "elastix":
            return run_elastix(c.fixed, c.moving, c.geom, threads)
        return run_convexadam(c.fixed, c.moving, c.geom, device)

    rec: dict[str, Any] = {"pairs": {}}
    for c in cases:
        times, cpu = [], []
        for _ in range(max(1, repeats) if method in TIMED else 1):
            c0 = time.process_time()
            u, dt = one(c)
            times.append(dt)
            cpu.append(time.process_time() - c0)
        rec["pairs"][c.name] = {**_timing(times, cpu), **metrics(u, c)}
    return rec


def evaluate(cases: Sequence[Case], methods: Sequence[str], device: str = "cpu", threads: int = 2,
             repeats: int = 1, settings: FFDSettings | None = None,
             deepali_settings: DeepaliSettings | None = None) -> dict[str, Any]:
    """Run ``methods`` (:data:`~bench.registration_methods.METHODS`) on ``cases``; ``settings`` are ours,
    ``deepali_settings`` deepali-example's (None: the defaults)."""
    check_methods(methods)
    out: dict[str, Any] = {"cases": {c.name: {"info": c.info, "shape": list(c.geom.shape),
                                              "spacing_mm": list(c.geom.spacing),
                                              "no_registration": metrics(np.zeros_like(c.gt), c)} for c in cases},
                           "methods": {}}
    for method in methods:
        rec = (_run_ours(cases, device, repeats, settings, batched=method == "ours") if method in OURS
               else _run_pairwise(method, cases, device, threads, repeats, deepali_settings))
        keys = ("seconds", "cpu_seconds", "lung_error_mean_mm", "lung_error_p95_mm", "landmark_error_mm",
                "folding_percent")
        rec["mean"] = {k: float(np.mean([p[k] for p in rec["pairs"].values()])) for k in keys}
        out["methods"][method] = rec
    out["acceptance"] = {f"{o} vs {b}": acceptance(out["methods"][o]["pairs"], out["methods"][b]["pairs"])
                         for o in OURS for b in BASELINES if o in out["methods"] and b in out["methods"]}
    return out


def tune(cases: Sequence[Case], candidates: dict[str, Any], device: str = "cpu",
         method: str = "ours") -> dict[str, Any]:
    """Score ``method``'s tuning ``candidates`` (``{name: settings}``, :func:`load_candidates` or a subset of it) on
    ``cases``; score = mean over pairs of lung error mean + p95 + landmark TRE (mm), lower is better."""
    out: dict[str, Any] = {"method": method, "candidates": {}}
    for name, s in candidates.items():
        rec = evaluate(cases, [method], device, settings=s if method == "ours" else None,
                       deepali_settings=s if method != "ours" else None)["methods"][method]
        pairs = rec["pairs"].values()
        score = float(np.mean([p["lung_error_mean_mm"] + p["lung_error_p95_mm"] + p["landmark_error_mm"]
                               for p in pairs]))
        bands = {b: float(np.mean([p["tre_by_boundary_distance"][b]["tre_mm"] for p in pairs
                                   if p["tre_by_boundary_distance"][b]["tre_mm"] is not None]))
                 for b in next(iter(pairs))["tre_by_boundary_distance"]}
        out["candidates"][name] = {"score": score, "settings": repr(s), **rec["mean"], "tre_bands_mean": bands,
                                   "pairs": {k: {**{m: p[m] for m in ("seconds", "lung_error_mean_mm",
                                                                      "lung_error_p95_mm", "landmark_error_mm")},
                                                 "tre_bands": {b: v["tre_mm"] for b, v in
                                                               p["tre_by_boundary_distance"].items()}}
                                             for k, p in rec["pairs"].items()}}
    out["best"] = min(out["candidates"], key=lambda k: out["candidates"][k]["score"])
    return out


def select_candidates(method: str, names: Sequence[str] = ()) -> dict[str, Any]:
    """``method``'s tuning candidates (the candidates file read once), all of them or the ``names`` subset in that
    order; ``ValueError`` names the unknown ones."""
    table = load_candidates(method)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown {method} tuning candidates {','.join(unknown)} (known: {', '.join(table)})")
    return {n: table[n] for n in names} if names else table


def check_methods(methods: Sequence[str]) -> None:
    """``ValueError`` naming the methods not in :data:`~bench.registration_methods.METHODS`."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {','.join(unknown)} ({', '.join(METHODS)})")


def run(device: str = "cpu", shape: Sequence[int] = (50, 256, 256), pairs: Sequence[str] = DEFAULT_PAIRS,
        methods: Sequence[str] = ("ours", "deepali", "elastix"), seed: int = 0, threads: int = 2,
        batch: str = "pairs", set_name: str = "phantom", repeats: int = 1,
        candidates: dict[str, Any] | None = None) -> dict:
    """Benchmark the methods on one set (:data:`~bench.registration_cases.SET_NAMES`; ``phantom`` and ``native``
    take ``seed`` and ``pairs``), or, given ``candidates`` (:func:`select_candidates` of the one method in
    ``methods``), score those tuning candidates; returns the JSON-ready record.  ``batch`` is kept for
    ``python -m bench`` (ours batches a patient's pairs)."""
    from bench.common import environment

    if candidates is not None and len(methods) != 1:
        raise ValueError(f"tuning takes one method, got {','.join(methods)}")
    torch.set_num_threads(threads)
    env_before = environment(device)
    cases = cases_for(set_name, shape, seed, pairs)
    out: dict[str, Any] = {"set": set_name, "shape": list(shape), "threads": threads, "repeats": repeats,
                           "ours_batch": batch}
    if candidates is not None:
        out["tuning"] = tune(cases, candidates, device, methods[0])
    else:
        out.update(evaluate(cases, methods, device, threads, repeats))
    out["environment"] = {"before": env_before, "after": environment(device)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.registration", description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="phantom", choices=SET_NAMES)
    ap.add_argument("--tune", action="store_true",
                    help=f"score the tuning candidates of --methods {' or '.join(SETTINGS)} on the set")
    ap.add_argument("--candidates", default="", help="with --tune: a comma-separated subset of the candidates")
    ap.add_argument("--shape", default="50,256,256")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--pairs", default=",".join(DEFAULT_PAIRS))
    ap.add_argument("--methods", default="ours,deepali,elastix,convexadam",
                    help=f"comma-separated: {','.join(METHODS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args(argv)
    if a.tune and a.set not in TUNING_SETS:
        ap.error(f"--tune runs on the tuning sets only (--set {' or '.join(TUNING_SETS)})")
    methods = a.methods.split(",")
    if a.tune and a.methods == ap.get_default("methods"):
        methods = ["ours"]
    names = [n for n in a.candidates.split(",") if n]
    try:
        check_methods(methods)
        if a.tune and (len(methods) != 1 or methods[0] not in SETTINGS):
            raise ValueError(f"--tune takes one of --methods {', '.join(SETTINGS)}, not {a.methods}")
        candidates = select_candidates(methods[0], names) if a.tune else None
    except ValueError as e:
        ap.error(str(e))
    shape = tuple(int(v) for v in a.shape.replace("x", ",").split(","))
    rec = run(a.device, shape, a.pairs.split(","), methods, a.seed, a.threads, "pairs", a.set,
              a.repeats, candidates)
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
