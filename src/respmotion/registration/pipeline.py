"""Register the phase pairs of a cohort: shard, skip finished pairs, batch a study's pairs, write atomically.

Each pair becomes ``<out>/<patient>/<study>/<name>.npz`` (:func:`~.bspline.save_bspline`, atomic) followed by
``<name>.json`` (its quality record).  A pair is finished when its ``.npz`` loads and records the SHA-256 of the
two phase files it was computed from and the same result settings; a rerun after a crash (even ``kill -9``)
skips those, removes the temporary files of its own unfinished pairs and redoes them, and redoes a pair whose
``.npz`` is unreadable (truncated) or whose phase images or settings changed since.  Load a result as a dense field with :func:`respmotion.registration.load_pair_field` or
:func:`~.bspline.dense_field`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from itertools import groupby
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..anatomy import body_mask, sliding_region
from ..config import to_dict, upgrade_keys
from ..core.geometry import Geometry
from ..io.atomic import TMP_PREFIX, file_sha256, write_json, write_npy
from ..io.layout import StudyDir, iter_studies
from ..runtime import available_memory, resolve_device, resolve_rank, use_threads
from .bspline import BSplineField, blend_weight, dense_tensor, load_bspline, save_bspline
from .config import RegisterConfig
from .ffd import register
from .pairs import Pair, shard, study_pairs
from .quality import quality_record

log = logging.getLogger("respmotion.register")


# settings that do not change a pair's result (which patients, batching, extra mask files)
_NOT_RESULT_SETTINGS = ("patients", "batch_size", "write_masks")


def result_settings(cfg: RegisterConfig) -> dict:
    """The settings a stored pair must have been computed with to count as finished."""
    d = _settings_dict(cfg)
    for k in _NOT_RESULT_SETTINGS:
        d.pop(k, None)
    return d


def pair_inputs(pair: Pair) -> dict[str, str]:
    """SHA-256 of the fixed and moving phase files (a pair is redone when they change)."""
    return {"fixed_sha256": file_sha256(pair.study.phase_path(pair.fixed)),
            "moving_sha256": file_sha256(pair.study.phase_path(pair.moving))}


def pair_done(pair: Pair, out: str | os.PathLike, inputs: dict[str, str] | None = None,
              settings: dict | None = None) -> bool:
    """True when a stored name of ``pair`` loads and (when given) was computed from ``inputs`` with
    ``settings`` (see :func:`pair_inputs`, :func:`result_settings`); missing aliases/quality files are
    restored.  An unreadable (e.g. truncated) file is removed and the pair redone."""
    paths = pair.paths(out)
    good = None
    for p in paths:
        if p.exists():
            try:
                good = load_bspline(p)
                break
            except ValueError as exc:
                log.warning("%s: unreadable (%s), will redo", p, type(exc).__name__)
                p.unlink()
    if good is None:
        return False
    if inputs is not None and {k: good.meta.get("inputs", {}).get(k) for k in inputs} != inputs:
        log.warning("%s: computed from other phase images than %s now holds, will redo", paths[0], pair.study.path)
        return False
    stored = upgrade_keys(RegisterConfig, good.meta.get("settings", {}))  # settings renamed since: today's names
    if settings is not None and {k: v for k, v in stored.items() if k not in _NOT_RESULT_SETTINGS} != settings:
        log.warning("%s: computed with other registration settings, will redo", paths[0])
        return False
    for p in paths:
        if not p.exists():
            save_bspline(good, p)
        if not p.with_suffix(".json").exists():
            write_json(p.with_suffix(".json"), good.meta)
    return True


def _clean_own_tmp(files: list[Path]) -> None:
    """Remove the temporary files a killed writer left of ``files`` (only this rank's: other shards write beside)."""
    for f in files:
        for t in f.parent.glob(f"{TMP_PREFIX}{f.stem}-*") if f.parent.is_dir() else ():
            t.unlink()


def _mask_path(out: Path, study, k: int) -> Path:
    return out / study.patient / study.study / "masks" / f"body_{k:02d}.npy"


def _write_masks(cache: "_StudyCache", phases: set[int], out: Path) -> None:
    for k in sorted(phases):
        write_npy(_mask_path(out, cache.study, k), cache.body_mask(k))


PAIR_BYTES_PER_VOXEL = 100  # memory a pair adds while registered (7.2 GB for 2 pairs of 141x512x512, CPU)


def auto_batch_size(n_pairs: int, shape: Sequence[int], device: torch.device) -> int:
    """Pairs per optimiser batch when ``batch_size`` is 0: all ``n_pairs`` of a study if they fit in half the
    memory free now (CPU: MemAvailable; CUDA: the device's free memory), else as many as do, at least 1.  A
    50x256x256 pair takes about 0.3 GB, a 141x512x512 one 3.7 GB (``bench.registration --set native``)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    return max(1, min(n_pairs, int(0.5 * free // (math.prod(shape) * PAIR_BYTES_PER_VOXEL))))


class _StudyCache:
    """Phases, body masks, sliding regions and their blend weights of one study, each made once per phase."""

    def __init__(self, study: StudyDir, cfg: RegisterConfig):
        self.study, self.cfg = study, cfg
        self.images: dict[int, np.ndarray] = {}
        self.body: dict[int, np.ndarray] = {}
        self.lung: dict[int, np.ndarray] = {}
        self.weight: dict[int, np.ndarray] = {}
        self.geometry: Geometry | None = None

    def image(self, k: int) -> np.ndarray:
        if k not in self.images:
            vol = self.study.load_phase(k)
            if self.geometry is None:
                self.geometry = vol.geometry
            elif not vol.geometry.same_as(self.geometry):
                raise ValueError(f"{self.study.phase_path(k)}: geometry differs from the study's other phases")
            self.images[k] = vol.array.astype(np.float32)
        return self.images[k]

    def body_mask(self, k: int) -> np.ndarray:
        if k not in self.body:
            self.body[k] = body_mask(self.image(k), self.cfg.body_threshold_hu)
        return self.body[k]

    def sliding_mask(self, k: int) -> np.ndarray:
        """Phase ``k``'s region for the sliding blend (``cfg.ffd.sliding_region``: lung mask or thoracic cavity)."""
        if k not in self.lung:
            self.lung[k] = sliding_region(self.image(k), self.body_mask(k), self.geometry,
                                          self.cfg.ffd.sliding_region, self.cfg.lung_threshold_hu)
        return self.lung[k]

    def blend_weight(self, k: int) -> np.ndarray:
        """Phase ``k``'s inside-field weight (:func:`blend_weight` of :meth:`sliding_mask`): a distance transform,
        so made once per fixed phase, not per pair (``ref_XX`` and ``step_(XX-10)`` share fixed phase XX)."""
        if k not in self.weight:
            self.weight[k] = blend_weight(self.sliding_mask(k), self.geometry.spacing, self.cfg.ffd.sliding_ramp_mm)
        return self.weight[k]


def register_batch(cache: _StudyCache, batch: list[Pair], cfg: RegisterConfig, out: Path,
                   device: torch.device, mask_owner: set[int], inputs: dict[Pair, dict[str, str]] | None = None
                   ) -> list[dict]:
    """Register ``batch`` (pairs of one study) in one tensor and write every result; returns their records.

    ``inputs``: each pair's :func:`pair_inputs`, recorded in its quality record (computed here if missing)."""
    t0 = time.perf_counter()
    fixed = np.stack([cache.image(p.fixed) for p in batch])
    moving = np.stack([cache.image(p.moving) for p in batch])
    body = np.stack([cache.body_mask(p.fixed) for p in batch])
    region = np.stack([cache.sliding_mask(p.fixed) for p in batch]) if cfg.ffd.sliding else None
    weight = np.stack([cache.blend_weight(p.fixed) for p in batch]) if cfg.ffd.sliding else None
    geom = cache.geometry
    ramp = cfg.ffd.sliding_ramp_mm
    to = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    field, opt_log = register(to(fixed), to(moving), to(body), geom.spacing, cfg.ffd,
                              inside_weight=None if weight is None else to(weight))
    seconds = (time.perf_counter() - t0) / len(batch)
    grid = field.grid
    if cfg.write_masks:  # before the pairs: a pair on disk means its fixed phase's mask is too
        _write_masks(cache, {p.fixed for p in batch} & mask_owner, out)
    records = []
    for b, pair in enumerate(batch):
        stored_coef = field.coef[b].cpu().numpy().astype(cfg.coef_dtype)
        u = dense_tensor(torch.as_tensor(stored_coef.astype(np.float32))[None], grid,
                         None if weight is None else torch.as_tensor(weight[b:b + 1]))[0]
        q = quality_record(torch.as_tensor(fixed[b]), torch.as_tensor(moving[b]), torch.as_tensor(body[b]), u,
                           geom.spacing)
        meta = {"patient": pair.study.patient, "study": pair.study.study, "names": list(pair.names),
                "fixed_phase": pair.fixed, "moving_phase": pair.moving,
                "convention": "pull: fixed(p) ~= moving(p + u(p)); u (3,z,y,x) mm on the fixed grid",
                "quality": {**q, "seconds": seconds, "batch_size": len(batch), "device": str(device)},
                "optimiser": {"levels": [{k: v for k, v in lv.items() if k != "trace"} for lv in opt_log["levels"]],
                              "folding_repair": opt_log["repair"]["pairs"][b] if "repair" in opt_log else None},
                "settings": _settings_dict(cfg),
                "inputs": (inputs or {}).get(pair) or pair_inputs(pair)}
        stored = BSplineField(stored_coef, grid, geom, meta, None if region is None else region[b], ramp)
        for path in pair.paths(out):
            save_bspline(stored, path)
        for path in pair.paths(out):
            write_json(path.with_suffix(".json"), meta)
        records.append(meta)
    return records


def _settings_dict(cfg: RegisterConfig) -> dict:
    d = to_dict(cfg)
    for k in ("data", "out", "rank", "world_size", "device", "threads"):
        d.pop(k, None)
    return d


def run_registration(cfg: RegisterConfig) -> dict:
    """Register this rank's share of the cohort's pairs; returns a summary (counts, seconds).

    Pairs stored with other phase images or result settings are redone (see :func:`pair_done`).
    ``respmotion register`` also owns the output folder (:mod:`respmotion.io.ownership`)."""
    cfg.check()
    if not cfg.data or not cfg.out:
        raise ValueError("register needs --data and --out")
    rank, world = resolve_rank(cfg.rank, cfg.world_size)
    device = resolve_device(cfg.device)
    use_threads(cfg.threads)
    out = Path(cfg.out)
    studies = list(iter_studies(cfg.data))
    if not studies:
        raise ValueError(f"{cfg.data}: no complete study (study.json) found")
    if cfg.patients:
        missing = sorted(set(cfg.patients) - {s.patient for s in studies})
        if missing:
            raise ValueError(f"{cfg.data}: no complete study of patient(s) {', '.join(missing)}")
        studies = [s for s in studies if s.patient in set(cfg.patients)]
    settings = result_settings(cfg)
    all_pairs = [p for s in studies for p in study_pairs(s, cfg.pairs, cfg.reference)]
    mine = shard(all_pairs, rank, world)
    # the body mask of a phase is written by the rank that owns the first pair with that fixed phase
    owners: dict[str, set[int]] = {}
    for i, p in enumerate(all_pairs):
        first = next(q for q in all_pairs if q.study == p.study and q.fixed == p.fixed)
        if first is p and i % world == rank:
            owners.setdefault(p.study.key, set()).add(p.fixed)
    summary = {"rank": rank, "world_size": world, "pairs_assigned": len(mine), "skipped": 0, "registered": 0,
               "seconds": 0.0}
    t0 = time.perf_counter()
    for study_key, group in groupby(mine, key=lambda p: p.study.key):
        group = list(group)
        masks = owners.get(study_key, set()) if cfg.write_masks else set()
        _clean_own_tmp([path for p in group for path in p.paths(out)]
                       + [_mask_path(out, group[0].study, k) for k in masks])
        inputs = {p: pair_inputs(p) for p in group}
        todo = [p for p in group if not pair_done(p, out, inputs[p], settings)]
        summary["skipped"] += len(group) - len(todo)
        cache = _StudyCache(group[0].study, cfg)
        done_phases = {p.fixed for p in group if p not in todo}
        missing = {k for k in masks & done_phases if not _mask_path(out, cache.study, k).exists()}
        _write_masks(cache, missing, out)  # a run of an older version died between a pair and its mask
        if not todo:
            continue
        size = cfg.batch_size or auto_batch_size(len(todo), cache.image(todo[0].fixed).shape, device)
        for i in range(0, len(todo), size):
            batch = todo[i:i + size]
            recs = register_batch(cache, batch, cfg, out, device, owners.get(study_key, set()), inputs)
            summary["registered"] += len(batch)
            for r in recs:
                q = r["quality"]
                log.info("%s/%s %s: NCC %.4f -> %.4f, folding %.3f %%, min det %.3f, %.1f s", r["patient"],
                         r["study"], ",".join(r["names"]), q["ncc_before"], q["ncc_after"], q["folding_percent"],
                         q["jacobian_min"], q["seconds"])
    summary["seconds"] = time.perf_counter() - t0
    return summary


def load_pair_field(out: str | os.PathLike, patient: str, study: str, name: str):
    """Dense :class:`~respmotion.core.types.DisplacementField` of a stored pair, e.g. ``name="ref_50"``."""
    from .bspline import dense_field

    return dense_field(Path(out) / patient / study / f"{name}.npz")
