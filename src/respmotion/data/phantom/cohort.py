"""Phantom cohorts on disk: :func:`write_cohort` writes patients ``phantom_000``... in the cohort layout
(:mod:`respmotion.io.layout`), one study each, with every phase's CT, lung and body masks, the exact reference
and consecutive-phase fields, landmarks and nodule trajectories; :func:`check_request` and :func:`check_memory`
refuse a bad request before anything is allocated or written."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ...core.types import DisplacementField, Volume
from ...io.atomic import clean_stale_tmp, write_json, write_npy
from ...io.layout import PHASES, StudyDir, next_phase
from ...io.ownership import claim
from ...runtime import check_allocation
from .curve import PHASE_CURVES
from .landmarks import landmark_table
from .params import DEFAULT_SHAPE
from .patient import make_patient

# peak memory of writing one patient: bytes a voxel for each phase computed at once (measured at
# 32x128x128: 293 B/voxel with one thread, 537 with two)
BYTES_PER_VOXEL_THREAD = 300


def check_request(shape: Sequence[int], noise_hu: float, patients: int = 1, seed: int = 0,
                  phase_curve: str = "patient") -> tuple[int, int, int]:
    """Validate a phantom request; returns the shape as ``(z, y, x)`` ints.

    Raises ``ValueError`` (one line) for a shape that is not 3 positive sizes, a negative noise
    level, fewer than one patient, a negative seed or an unknown ``phase_curve``."""
    if phase_curve not in PHASE_CURVES:
        raise ValueError(f"phantom phase_curve must be one of {', '.join(PHASE_CURVES)}, got {phase_curve!r}")
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"phantom shape must be 3 positive sizes z,y,x, got {','.join(map(str, shape))}")
    if not math.isfinite(noise_hu) or noise_hu < 0:
        raise ValueError(f"phantom noise_hu must be >= 0 HU (a standard deviation), got {noise_hu:g}")
    if patients < 1:
        raise ValueError(f"phantom patients must be >= 1, got {patients}")
    if seed < 0:
        raise ValueError(f"phantom seed must be >= 0, got {seed}")
    return shape  # type: ignore[return-value]


def check_memory(shape: Sequence[int], parallel: int) -> None:
    """Refuse (``MemoryError`` with the numbers) a request the machine cannot hold, before allocating."""
    check_allocation("phantom", shape, BYTES_PER_VOXEL_THREAD * parallel, f"{parallel} phase(s) at once")


def write_patient(out: str | Path, patient_id: str, seed: int, shape: Sequence[int] = DEFAULT_SHAPE,
                  noise_hu: float = 10.0, threads: int = 2, phase_curve: str = "patient") -> StudyDir:
    """Write one phantom patient (one study) in the cohort layout; skips a complete study.

    ``threads``: phases computed and written concurrently (numpy and torch release the GIL in the
    heavy loops); the files do not depend on it.  The completion marker is written last.  Use
    :func:`write_cohort` for a whole output folder (it owns the folder, see :mod:`respmotion.io.ownership`)."""
    shape = check_request(shape, noise_hu, 1, seed, phase_curve)
    sd = StudyDir(Path(out) / patient_id / "study_0")
    if sd.is_complete():
        return sd
    if sd.path.exists():  # an interrupted writer's temporary files (the folder's owner lock excludes a live one)
        clean_stale_tmp(sd.path)
    ph = make_patient(seed, shape, noise_hu, phase_curve)
    g = ph.geometry
    ph.prepare()  # the inputs the phases share, built before the threads start

    def one_phase(k: int) -> None:
        d = ph.phase(k)
        meta = {"patient": patient_id, "phase_percent": k, "source": "phantom", "seed": seed, "units": "HU"}
        sd.save_phase(k, Volume(d["image"], g, meta))
        write_npy(sd.mask_path("lung", k), d["lung"])
        write_npy(sd.mask_path("body", k), d["body"])
        sd.save_gt("ref", k, DisplacementField(d["dvf"], g, {"from": "phase_00", "to": f"phase_{k:02d}"}))
        del d
        k1 = next_phase(k)
        sd.save_gt("step", k, DisplacementField(ph.step_field(k, k1), g,
                                                {"from": f"phase_{k:02d}", "to": f"phase_{k1:02d}"}))

    if threads <= 1:
        for k in PHASES:
            one_phase(k)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(one_phase, k) for k in PHASES]:
                f.result()  # an error in any phase is raised here, before the study is marked complete
    write_json(sd.landmarks_path, landmark_table(ph))
    p = ph.p
    nodules = ph.anatomy.nodules
    nod_traj = {f"{k:02d}": [c[::-1].tolist() for c in ph.move_points(k, np.array([n[0] for n in nodules]))]
                for k in PHASES}
    sd.mark_complete({
        "patient": patient_id, "study": "study_0", "phases": list(PHASES), "source": "phantom", "seed": seed,
        "reference_phase": 0, "geometry": g.to_dict(),
        "motion": {"diaphragm_si_excursion_mm": p.amp_si, "ap_excursion_mm": p.amp_ap, "lr_excursion_mm": p.amp_lr,
                   "end_exhale_phase": ph.curve.peak, "phase_curve_n": ph.curve.n, "hysteresis_eta": ph.curve.eta},
        "nodules": [{"center_lps_mm_phase00": n[0][::-1].tolist(), "radius_mm": n[1]} for n in nodules],
        "nodule_trajectory_lps_mm": nod_traj,
    })
    return sd


def write_cohort(out: str | Path, patients: int, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE,
                 noise_hu: float = 10.0, progress: bool = False, workers: int = 1,
                 overwrite: bool = False, phase_curve: str = "patient") -> list[StudyDir]:
    """Write ``patients`` phantom patients ``phantom_000``... (patient i uses seed ``seed * 1000 + i``).

    ``phase_curve``: ``"patient"`` (each patient breathes on its own curve) or ``"population"`` (all on the
    reference's curve), :data:`PHASE_CURVES`.  ``workers`` > 1 writes patients in parallel processes, the cores
    left to each run its phases in threads; the result does not depend on either.  Measured on 2 cores at
    50x256x256: one process (2 threads) 11.7 s a patient, two processes 13 s a patient (each imports torch).

    The request is checked first (sizes, noise, memory: ``ValueError`` / ``MemoryError`` before
    anything is allocated or written).  ``out`` is owned (:func:`respmotion.io.ownership.claim`):
    a rerun with the same patients/seed/shape/noise resumes, another one is refused unless
    ``overwrite`` (which empties ``out`` first), and a second process writing ``out`` is refused."""
    shape = check_request(shape, noise_hu, patients, seed, phase_curve)
    if workers < 1:
        raise ValueError(f"phantom workers must be >= 1, got {workers}")
    procs = min(workers, patients) if workers > 1 else 1
    threads = max(1, min(4, (os.cpu_count() or 1) // procs))  # phases of a patient in threads (see write_patient)
    check_memory(shape, procs * threads)
    identity = {"patients": patients, "seed": seed, "shape": list(shape), "noise_hu": float(noise_hu)}
    if phase_curve != "patient":  # absent for the default: folders written before the option keep their identity
        identity["phase_curve"] = phase_curve
    with claim(out, "phantom", identity, overwrite=overwrite):
        return _write_jobs(out, patients, seed, shape, noise_hu, progress, workers, threads, phase_curve)


def _write_jobs(out: str | Path, patients: int, seed: int, shape: tuple[int, int, int], noise_hu: float,
                progress: bool, workers: int, threads: int, phase_curve: str) -> list[StudyDir]:
    """The patients of :func:`write_cohort` (its checks and folder claim done)."""
    jobs = [(out, f"phantom_{i:03d}", seed * 1000 + i, tuple(shape), noise_hu, threads, phase_curve)
            for i in range(patients)]
    bar = tqdm(total=len(jobs), desc="phantom", unit="patient", disable=not progress)
    studies = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                studies.append(write_patient(*job))
                bar.update()
        else:
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(write_patient, *job) for job in jobs]
                for f in futures:  # in patient order; an error in any worker is raised here
                    studies.append(f.result())
                    bar.update()
    finally:
        bar.close()  # also on an error: its message then starts on a line of its own
    return studies
