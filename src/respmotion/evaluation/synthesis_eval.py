"""Evaluate synthesized motion on held-out studies against truth and two baselines.

For every study the motion model gets phase 00 only.  Its fields (pull, phase k vs 00, mm) are
compared with

* the reference motion: the phantom's exact ground truth (``gt/``) and/or registration fields,
* the **zero field** (no motion) and the **population-mean field** (mean of the training
  studies' reference fields, phase by phase) as baselines a useful model must beat; for a diffusion model
  with a motion prior also the **model's prior** alone (``model_prior``: what the network starts from).

Per phase: DVF error in the lungs (mean, p95), SSIM/PSNR/MAE of the warped CT vs the real phase,
% folding voxels, lung volume change, diaphragm superior-inferior excursion (00 -> 50), the
breathing curve (mean lung displacement per phase) and landmark errors where landmarks exist.

A generative model is judged as a generator (:mod:`respmotion.evaluation.ensemble`): with ``samples`` K > 1
its K cycles give, beside the first sample's metrics (candidate ``model``), the metrics of their mean field
(candidate ``model_mean``) and per phase the energy score and the samples' spread; the report's
``generator`` table averages them over the studies, with the population mean's error (its energy score:
a point forecast) beside them, and ``breathing_band`` holds the samples' range of the breathing curve.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from ..anatomy.measures import diaphragm_excursion
from ..core.ops import warp_volume
from ..core.types import DisplacementField, Volume
from ..io.atomic import read_npy
from ..io.layout import PHASES, StudyDir
from . import metrics as M
from .ensemble import ensemble_scores
from .landmarks import landmark_error

FieldLoader = Callable[[StudyDir, int], DisplacementField]


def gt_fields(study: StudyDir) -> dict[int, DisplacementField]:
    return {k: study.load_gt("ref", k) for k in PHASES}


def mean_fields(studies: Sequence[StudyDir], load: FieldLoader) -> dict[int, DisplacementField]:
    """Population-mean field per phase over ``studies`` (same grid required)."""
    if not studies:
        raise ValueError("the population-mean baseline needs at least one training study")
    out = {}
    for k in PHASES:
        fs = [load(s, k) for s in studies]
        g = fs[0].geometry
        for s, f in zip(studies, fs):
            if f.geometry.shape != g.shape:
                raise ValueError(f"{s.path}: field shape {f.geometry.shape} differs from {g.shape}")
        out[k] = DisplacementField(np.mean([f.array for f in fs], axis=0).astype(np.float32), g)
    return out


def _on(geom_src: DisplacementField, geometry) -> DisplacementField:
    return DisplacementField(geom_src.array, geometry, dict(geom_src.meta))


def _lung(study: StudyDir, k: int, ct: Volume) -> Volume:
    p = study.mask_path("lung", k)
    if p.exists():
        return Volume(read_npy(p).astype(np.uint8), ct.geometry)
    from ..anatomy import lung_mask

    return Volume(lung_mask(study.load_phase(k).array), ct.geometry)


def evaluate_fields(study: StudyDir, fields: Mapping[int, DisplacementField],
                    truth: Mapping[int, DisplacementField] | None, images: bool = True) -> dict:
    """Metrics of one candidate motion (``fields``) on one study."""
    ct = study.load_phase(0)
    lung0 = _lung(study, 0, ct)
    lung50 = _lung(study, 50, ct)
    rec: dict = {"per_phase": {}, "breathing_curve": {}}
    errs, ssims = [], []
    for k in PHASES:
        f = _on(fields[k], ct.geometry)
        ph: dict = {"folding_percent": M.folding_percent(f)}
        if truth is not None:
            lung_k = _lung(study, k, ct)
            e = M.dvf_error(f, _on(truth[k], ct.geometry), lung_k)
            ph["dvf_error_lung"] = e
            if k != 0:
                errs.append(e["mean"])
        if images and k != 0:
            sim = M.image_similarity(warp_volume(ct, f), study.load_phase(k), lung0)
            ph["image"] = sim
            ssims.append(sim["ssim"])
        rec["per_phase"][f"{k:02d}"] = ph
        rec["breathing_curve"][f"{k:02d}"] = M.mean_displacement(f, lung0)
    f50 = _on(fields[50], ct.geometry)
    rec["diaphragm_excursion_mm"] = diaphragm_excursion(lung0, f50)["mean_mm"]
    rec["lung_volume_change"] = M.lung_volume_change(lung0, M.warp_mask(lung0, f50))
    rec["real_lung_volume_change"] = M.lung_volume_change(lung0, lung50)
    if errs:
        rec["dvf_error_lung_mean_mm"] = float(np.mean(errs))
    if ssims:
        rec["ssim_mean"] = float(np.mean(ssims))
    rec["folding_percent_max"] = max(v["folding_percent"] for v in rec["per_phase"].values())
    if study.landmarks_path.exists():
        from ..io.landmarks import read_landmarks_json

        lms = read_landmarks_json(study.landmarks_path)
        per = {}
        for k in PHASES:
            if k == 0 or k not in lms:
                continue
            per[str(k)] = {"field": landmark_error(_on(fields[k], ct.geometry), lms[0], lms[k]).summary(),
                           "no_motion": landmark_error(None, lms[0], lms[k]).summary()}
        rec["landmarks"] = {"units": "mm", "phases": per}  # the landmark_report layout
        rec["landmark_error_mean_mm"] = float(np.mean([v["field"]["all"]["mean"] for v in per.values()]))
    return rec


def evaluate_study(study: StudyDir, candidates: Mapping[str, Mapping[int, DisplacementField]],
                   truth: Mapping[int, DisplacementField] | None) -> dict:
    """Evaluate several candidate motions (model sample(s), baselines) on one study."""
    out = {name: evaluate_fields(study, f, truth, images=(name != "truth")) for name, f in candidates.items()}
    ct = study.load_phase(0)
    if truth is not None:
        out["truth"] = {
            "breathing_curve": {f"{k:02d}": M.mean_displacement(_on(truth[k], ct.geometry), _lung(study, 0, ct))
                                for k in PHASES},
            "diaphragm_excursion_mm": diaphragm_excursion(_lung(study, 0, ct), _on(truth[50], ct.geometry))["mean_mm"],
        }
    return out


def generator_scores(study: StudyDir, ct: Volume, cycles: Sequence[Mapping[int, DisplacementField]],
                     truth: Mapping[int, DisplacementField]) -> dict:
    """Per phase 10..90 (``"10"``...): :func:`~respmotion.evaluation.ensemble.ensemble_scores` of the K sampled
    fields against the truth in that phase's lungs, plus their means over the phases (``"mean"``); ``ct`` is the
    study's phase 00 (the caller's, not read again)."""
    per = {}
    for k in PHASES[1:]:
        lung = _lung(study, k, ct).array != 0
        samples = np.stack([c[k].array for c in cycles])
        per[f"{k:02d}"] = ensemble_scores(samples, truth[k].array, lung)
    keys = ("single_sample_error", "mean_error", "energy_score", "spread")
    return {"per_phase": per, "mean": {key: float(np.mean([v[key] for v in per.values()])) for key in keys},
            "samples": len(cycles)}


def summarise(per_study: dict[str, dict]) -> dict:
    """Headline numbers averaged over studies for each candidate."""
    names = sorted({n for rec in per_study.values() for n in rec if n != "truth"})
    head: dict = {}
    for n in names:
        recs = [r[n] for r in per_study.values() if n in r]
        for key in ("dvf_error_lung_mean_mm", "ssim_mean", "landmark_error_mean_mm", "diaphragm_excursion_mm",
                    "folding_percent_max"):
            vals = [r[key] for r in recs if key in r]
            if vals:
                head[f"{n}/{key}"] = float(np.mean(vals))
        gen = [r["generator"]["mean"] for r in recs if "generator" in r]
        if gen:
            head[f"{n}/energy_score_mm"] = float(np.mean([g["energy_score"] for g in gen]))
            head[f"{n}/spread_mm"] = float(np.mean([g["spread"] for g in gen]))
            head[f"{n}/samples"] = int(recs[0]["generator"]["samples"])
    truth = [r["truth"]["diaphragm_excursion_mm"] for r in per_study.values() if "truth" in r]
    if truth:
        head["truth/diaphragm_excursion_mm"] = float(np.mean(truth))
    return head


def _phase_means(per_study: dict[str, dict], name: str, value: Callable[[dict], dict]) -> dict[str, float]:
    """``{phase: mean over the studies}`` of ``value(record of candidate name)`` (a ``{phase: number}`` dict)."""
    rows = [value(r[name]) for r in per_study.values() if name in r]
    return {k: float(np.mean([row[k] for row in rows if k in row])) for k in rows[0]} if rows else {}


def report_dict(per_study: dict[str, dict], title: str, seconds: float) -> dict:
    """The structure :func:`respmotion.evaluation.report.write_report` draws: DVF errors and the generator table
    averaged over the studies; breathing curves, the sample band and landmarks of the first study."""
    first = next(iter(per_study.values()))
    curves = {n: r["breathing_curve"] for n, r in first.items() if "breathing_curve" in r}
    names = [n for n, r in first.items() if "per_phase" in r]
    dvf = {n: _phase_means(per_study, n, lambda r: {k: v["dvf_error_lung"]["mean"] for k, v in r["per_phase"].items()
                                                    if "dvf_error_lung" in v}) for n in names}
    dvf = {n: v for n, v in dvf.items() if v}
    lms = {n: r["landmarks"] for n, r in first.items() if "landmarks" in r and n != "zero"}
    out = {"title": title, "headline": summarise(per_study), "breathing_curve": curves,
           "dvf_error_per_phase": dvf, "landmarks": lms, "studies": per_study, "seconds": seconds}
    if "generator" in first.get("model", {}):
        keys = ("single_sample_error", "mean_error", "energy_score", "spread")
        gen = {key: _phase_means(per_study, "model", lambda r, key=key: {k: v[key] for k, v in
                                                                         r["generator"]["per_phase"].items()})
               for key in keys}
        if "population_mean" in dvf:
            gen["population_mean_error"] = {k: v for k, v in dvf["population_mean"].items() if k != "00"}
        out["generator"] = gen
        out["breathing_band"] = {"model samples": first["model"]["breathing_band"]}
    return out


def timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t


def run_evaluation(studies: Sequence[StudyDir], model, train_studies: Sequence[StudyDir], out_dir: str | Path,
                   samples: int = 1, seed: int = 0, truth: str = "gt", title: str = "respmotion synthesis") -> dict:
    """Synthesize for each held-out study (from phase 00) and write the report to ``out_dir``.

    ``model`` is a motion model, or a function ``study -> motion model`` (e.g. the phantom's own
    ground truth per study).
    """
    from .report import write_report

    t0 = time.perf_counter()
    load = (lambda s, k: s.load_gt("ref", k)) if truth == "gt" else None
    baseline_mean = mean_fields(train_studies, load) if load is not None and train_studies else None
    model_for = model if not hasattr(model, "generate") else (lambda _study: model)
    per_study = {}
    for sd in tqdm(studies, desc=f"evaluate ({samples} sample{'s' if samples > 1 else ''} each)", unit="patient"):
        ct = sd.load_phase(0)
        motion = model_for(sd)
        cycles = motion.generate(ct, samples, seed)
        cands: dict[str, Mapping[int, DisplacementField]] = {"model": cycles[0]}
        if samples > 1:
            cands["model_mean"] = {k: DisplacementField(np.mean([c[k].array for c in cycles], axis=0), ct.geometry)
                                   for k in PHASES}
        zero = {k: DisplacementField(np.zeros((3, *ct.geometry.shape), np.float32), ct.geometry) for k in PHASES}
        cands["zero"] = zero
        if baseline_mean is not None:
            cands["population_mean"] = baseline_mean
        prior = motion.prior_fields(ct) if hasattr(motion, "prior_fields") else None
        if prior is not None:
            cands["model_prior"] = prior
        tr = gt_fields(sd) if truth == "gt" and sd.gt_path("ref", 0).exists() else None
        rec = evaluate_study(sd, cands, tr)
        if samples > 1:
            lung0 = _lung(sd, 0, ct)
            rec["model"]["sample_diversity_50"] = M.sample_diversity([c[50] for c in cycles], lung0)
            curves = np.array([[M.mean_displacement(_on(c[k], ct.geometry), lung0) for k in PHASES] for c in cycles])
            rec["model"]["breathing_band"] = {f"{k:02d}": [float(lo), float(hi)]
                                              for k, lo, hi in zip(PHASES, curves.min(0), curves.max(0))}
            if tr is not None:
                rec["model"]["generator"] = generator_scores(sd, ct, cycles, tr)
        per_study[sd.key] = rec
    report = report_dict(per_study, title, time.perf_counter() - t0)
    write_report(out_dir, report)
    return report
