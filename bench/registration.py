"""Registration benchmark: ours vs hf-deepali FFD vs elastix vs ConvexAdam, same pairs, same run, printing JSON.

Tuning protocol (issue 19): settings are chosen on the *tuning* set only and reported on the *held-out* set, whose
phantom patients have breathing amplitudes outside the tuning patients' range and whose pairs the tuning set lacks::

    python -m bench.registration --set tune --tune          # ours: candidate settings on the tuning set
    python -m bench.registration --set tune --tune --methods deepali   # the same for the deepali baseline
    python -m bench.registration --set heldout              # every method on the held-out set (the acceptance)
    python -m bench.registration --set real                 # real-texture lung CT pair, 51 landmarks
    python -m bench.registration --set native --methods ours --pairs ref_50   # time and memory at 141x512x512
    python -m bench.registration --set phantom --seed 0     # one phantom (``--pairs``; what `python -m bench` runs)

Common flags: ``--shape 50,256,256`` (phantom grid; develop at 32,128,128), ``--methods ours,deepali,elastix,
convexadam``, ``--threads 2``, ``--repeats 3`` (ours and deepali are timed this many times: median and spread;
elastix and ConvexAdam once), ``--device cpu|cuda``.

Sets (:data:`SETS`): *tune* = phantom seeds 5, 6, 9 (mean superior lung motion at end-exhale 6.8-7.6 mm), pairs
``ref_50``, ``step_20``; *tune_small* = the same seeds' pairs ``step_00``, ``step_60`` (0.3-1.4 mm lung mean:
the small-motion regime); *heldout* = seeds 0 (12.2 mm) and 4 (3.5 mm), pairs ``ref_50``, ``step_70``; *real* =
the small real lung CT of ``shared/data/elastix-lung-ct-small`` (:func:`real_case`); *native* = the phantom
``--seed``'s ``--pairs`` resampled to 141x512x512 (:func:`native_cases`).  POPI is never used.

Per method and pair: seconds (each repeat, median, spread), lung DVF error (mean / p95 mm on the fixed phase's true
lung voxels, against the exact pull field), landmark TRE (reference landmarks moved with the inverse of the pull),
split by the in-lung flag and binned by the target landmark's signed distance to the true lung boundary
(< 5, 5-15, > 15 mm; inside and outside), % voxels with Jacobian determinant <= 0.  ``acceptance`` compares ours
with deepali pair by pair.  Ours registers the pairs of one patient as one batch (time per pair = batch / pairs,
masks and dense fields included).  Baselines need the ``bench`` extra (hf-deepali, itk-elastix, convexadam).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from respmotion.anatomy import body_mask
from respmotion.core import DisplacementField, Geometry
from respmotion.core import warp as W
from respmotion.core.ops import resample_array
from respmotion.evaluation.landmarks import landmark_error
from respmotion.io.atomic import read_json
from respmotion.io.layout import StudyDir
from respmotion.registration.bspline import ControlGrid, blend_weight, dense_tensor
from respmotion.registration.ffd import FFDSettings, register, sliding_region

DEFAULT_PAIRS = ("ref_50", "step_20", "step_70")
STUDY_PAIRS = tuple(f"ref_{k}" for k in range(10, 100, 10)) + tuple(f"step_{k:02d}" for k in range(0, 100, 10))
SETS = {
    "tune": {"seeds": (5, 6, 9), "pairs": ("ref_50", "step_20")},
    "heldout": {"seeds": (0, 4), "pairs": ("ref_50", "step_70")},
    "tune_small": {"seeds": (5, 6, 9), "pairs": ("step_00", "step_60")},  # 0.3-1.4 mm lung mean: small motion
}
NATIVE_SHAPE = (141, 512, 512)  # a clinical thoracic CT's grid (POPI: 512x512x141)
BANDS_MM = (5.0, 15.0)  # landmark bins by distance to the lung boundary: < 5, 5-15, > 15 mm
REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "elastix-lung-ct-small"


def _pair_phases(name: str) -> tuple[int, int]:
    """``ref_XX`` -> (fixed XX, moving 0); ``step_XX`` -> (fixed XX+10, moving XX)."""
    kind, k = name.split("_")
    k = int(k)
    return (k, 0) if kind == "ref" else ((k + 10) % 100, k)


def _phantom_study(shape: Sequence[int], seed: int) -> StudyDir:
    from respmotion.data.phantom import write_patient

    root = Path(os.environ.get("RESPMOTION_BENCH_CACHE", tempfile.gettempdir())) / "respmotion-bench-phantom"
    tag = "x".join(str(int(s)) for s in shape)
    return write_patient(root / f"{tag}_seed{seed}", f"phantom_{seed:03d}", seed, tuple(shape))


@dataclass
class Case:
    """One registration pair with its truth: pull field ``gt`` ``(3, z, y, x)`` mm (fixed -> moving), the fixed
    phase's true lung mask, landmarks (LPS mm) in the moving (``ref``) and fixed (``tgt``) image."""

    name: str
    group: str  # ours registers the cases of one group as one batch
    fixed: np.ndarray
    moving: np.ndarray
    geom: Geometry
    gt: np.ndarray
    lung: np.ndarray
    ref: np.ndarray
    tgt: np.ndarray
    in_lung: np.ndarray
    info: dict


def phantom_cases(shape: Sequence[int], seed: int, pairs: Sequence[str]) -> list[Case]:
    sd = _phantom_study(shape, seed)
    geom = sd.load_phase(0).geometry
    lm = read_json(sd.landmarks_path)
    cases = []
    for n in pairs:
        fk, mk = _pair_phases(n)
        kind, k = n.split("_")
        cases.append(Case(f"seed{seed}_{n}", f"seed{seed}", sd.load_phase(fk).array, sd.load_phase(mk).array, geom,
                          sd.load_gt(kind, int(k)).array, np.load(sd.mask_path("lung", fk)) > 0,
                          np.asarray(lm["phases"][f"{mk:02d}"]), np.asarray(lm["phases"][f"{fk:02d}"]),
                          np.asarray(lm["in_lung"], bool), {"motion": sd.info().get("motion"), "seed": seed}))
    return cases


def native_cases(shape: Sequence[int], seed: int, pairs: Sequence[str],
                 native: Sequence[int] = NATIVE_SHAPE) -> list[Case]:
    """:func:`phantom_cases` resampled to a clinical CT's grid (same field of view, :meth:`Geometry.resized`):
    images and truth linearly (the truth in mm is unchanged by resampling), the lung mask by nearest neighbour;
    landmarks are world points and stay.  What it measures is time and memory at the size users have; accuracy is
    that of the smoother resampled images (no new anatomy at the finer grid)."""
    out = []
    for c in phantom_cases(shape, seed, pairs):
        big = lambda a: resample_array(a, native)  # noqa: E731
        out.append(replace(c, name=f"{c.name}_native", fixed=big(c.fixed), moving=big(c.moving),
                           geom=c.geom.resized(native), gt=big(c.gt), lung=resample_array(c.lung, native, order=0),
                           info={**c.info, "resampled_from": list(c.geom.shape)}))
    return out


def _rbf(points: np.ndarray, centres: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
    return np.exp(-0.5 * d2 / sigma**2) @ weights


def real_case(root: Path = REAL_DIR, sigma_mm: float = 30.0, ridge: float = 1.0, noise_hu: float = 10.0) -> Case:
    """The small real lung CT (elastix test data) as a pair with a known field.

    Only the baseline CT of the pair is in ``shared/data`` (the follow-up image is not), so the pair is made from
    it: the 51 landmark pairs' displacements (global translation removed: 4.2 mm mean) are interpolated by a
    smooth Gaussian RBF (``sigma_mm``, ridge-regularised) to a pull field ``v``; fixed = baseline pulled by ``v``
    (+ ``noise_hu`` Gaussian noise), moving = baseline; fixed landmarks solve ``q + v(q) = b``.  Real texture,
    real landmark positions and landmark-driven (not breathing-calibrated, no sliding) motion."""
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(root / "3DCT_lung_baseline_small.mha"))
    mask = sitk.Resample(sitk.ReadImage(str(root / "3DCT_lung_baseline_mask.mha")), ct, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0)
    geom = Geometry.from_itk(ct.GetSize(), ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())
    moving = sitk.GetArrayFromImage(ct).astype(np.float32)
    lung_moving = sitk.GetArrayFromImage(mask).astype(np.float32)

    def points(name):
        return np.loadtxt(root / name, skiprows=2)

    b, f = points("baseline_landmarks_51.txt"), points("followup_landmarks_51.txt")
    d = (f - b) - (f - b).mean(0)
    centres = b + d
    k = np.exp(-0.5 * ((centres[:, None] - centres[None]) ** 2).sum(-1) / sigma_mm**2)
    weights = np.linalg.solve(k + ridge * np.eye(len(k)), -d)  # v(b + d) ~ -d
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in geom.shape], indexing="ij"), -1).reshape(-1, 3)
    v_world = _rbf(geom.index_to_world(idx), centres, weights, sigma_mm).reshape(*geom.shape, 3)
    gt = np.moveaxis(geom.world_to_axes(v_world, axis=-1), -1, 0).astype(np.float32)  # (3, z, y, x) mm
    both = torch.as_tensor(np.stack([moving, lung_moving]))[None]
    warped = W.warp(both, torch.as_tensor(gt)[None], geom.spacing)[0].numpy()
    fixed = warped[0] + np.random.default_rng(0).normal(0.0, noise_hu, geom.shape).astype(np.float32)
    q = b.copy()
    for _ in range(100):  # fixed point of q = b - v(q) (|grad v| << 1)
        q = b - _rbf(q, centres, weights, sigma_mm)
    det = W.jacobian_determinant(torch.as_tensor(gt, dtype=torch.float64)[None], geom.spacing)[0]
    info = {"source": str(root), "rbf_sigma_mm": sigma_mm, "ridge": ridge, "noise_hu": noise_hu,
            "field_max_mm": float(np.linalg.norm(gt, axis=0).max()), "jacobian_min": float(det.min()),
            "landmark_residual_fit_mm": float(np.linalg.norm(q - b, axis=1).mean())}
    return Case("real_lung_small", "real", fixed, moving, geom, gt, warped[1] >= 0.5, b, q,
                np.ones(len(b), bool), info)


def _signed_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Signed distance (mm) to the mask's boundary: > 0 outside, < 0 inside."""
    return (ndimage.distance_transform_edt(~mask, sampling=spacing)
            - ndimage.distance_transform_edt(mask, sampling=spacing))


def _bands(err: np.ndarray, dist: np.ndarray) -> dict[str, Any]:
    lo, hi = BANDS_MM
    out = {}
    for side, sel in (("inside", dist < 0), ("outside", dist >= 0)):
        a = np.abs(dist)
        for label, band in ((f"<{lo:g}", a < lo), (f"{lo:g}-{hi:g}", (a >= lo) & (a <= hi)), (f">{hi:g}", a > hi)):
            m = sel & band
            out[f"{side}_{label}mm"] = {"n": int(m.sum()), "tre_mm": float(err[m].mean()) if m.any() else None}
    return out


def metrics(u: np.ndarray, case: Case) -> dict[str, Any]:
    """Accuracy of the pull field ``u`` ``(3, z, y, x)`` mm on ``case``."""
    err = np.linalg.norm(u - case.gt, axis=0)[case.lung]
    le = landmark_error(DisplacementField(u.astype(np.float32), case.geom), case.ref, case.tgt).errors_mm
    sd = _signed_distance(case.lung, case.geom.spacing)
    ix = np.clip(np.rint(case.geom.world_to_index(case.tgt)).astype(int), 0, np.array(case.geom.shape) - 1)
    dist = sd[ix[:, 0], ix[:, 1], ix[:, 2]]
    inside = case.in_lung
    return {
        "lung_error_mean_mm": float(err.mean()), "lung_error_p95_mm": float(np.percentile(err, 95)),
        "landmark_error_mm": float(le.mean()), "landmark_error_p95_mm": float(np.percentile(le, 95)),
        "landmark_error_sd_mm": float(le.std()),
        "landmark_error_inside_mm": float(le[inside].mean()),
        "landmark_error_outside_mm": float(le[~inside].mean()) if (~inside).any() else None,
        "landmarks_n": int(len(le)), "landmarks_inside_n": int(inside.sum()),
        "tre_by_boundary_distance": _bands(le, dist),
        "folding_percent": 100.0 * W.folding_fraction(torch.as_tensor(u)[None], case.geom.spacing),
    }


# ----------------------------------------------------------------------------- methods
def run_ours(fixed, moving, geom, device, settings: FFDSettings | None = None) -> tuple[list[np.ndarray], float, dict]:
    """Register all given pairs as one batch (masks included in the time); returns the dense fields, the
    amortised seconds per pair and the optimiser log (seconds per level, folding repair record)."""
    s = settings or FFDSettings()
    t0 = time.perf_counter()
    body = np.stack([body_mask(f) for f in fixed])
    lung = (np.stack([blend_weight(sliding_region(f, b, geom, s), geom.spacing, s.sliding_ramp_mm)
                      for f, b in zip(fixed, body)]) if s.sliding else None)
    to = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device)  # noqa: E731
    coef, log = register(to(np.stack(fixed)), to(np.stack(moving)), to(body), geom.spacing, s,
                         lung=None if lung is None else to(lung))
    grid = ControlGrid(geom.shape, s.for_shape(geom.shape).stride)
    u = [dense_tensor(coef[b:b + 1], grid, None if lung is None else to(lung[b:b + 1]))[0].cpu().numpy()
         for b in range(len(fixed))]
    dt = time.perf_counter() - t0
    return u, dt / len(fixed), log


@dataclass(frozen=True)
class DeepaliSettings:
    """hf-deepali FFD as its own example registers a pair (``examples/ffd`` of BioMedIA/deepali: ``params.yaml``,
    ``pairwise.py``): intensities clamped to ``clamp_hu`` and scaled to [0, 1]; a Gaussian pyramid of ``levels``
    (downsampled along ``pyramid_dims``, grid corners aligned); a FreeFormDeformation made on the coarsest level's
    grid with control points every ``stride`` voxels (x, y, z) *of the current level* (the control grid is
    subdivided at each finer level, so its mm spacing halves); loss = ``loss`` (a ``deepali.losses`` name; image
    terms on the overlap mask where the loss takes a voxel mask, as the example does) + ``bending`` x
    ``BSplineBending``; a new Adam per level, ``lr`` in deepali's normalised units (the image spans [-1, 1] on each
    axis), gradient normalised to unit length per control point before each step (the example's hook); at most
    ``max_steps`` steps a level, stopping when the least-squares slope of the last 10 loss values is below
    ``|min_delta| x`` the loss (``min_delta`` < 0: relative, the example's -0.01; 0: never).  The defaults are the
    example's except ``bending`` and ``min_delta``, chosen on the tuning set (:data:`DEEPALI_TUNING_CANDIDATES`,
    docs/registration.md)."""

    stride: tuple[int, int, int] = (8, 8, 5)
    levels: int = 3
    pyramid_dims: tuple[str, ...] = ("x", "y", "z")
    loss: str = "MSE"
    bending: float = 5e-4
    lr: float = 1e-3
    max_steps: int = 100
    min_delta: float = 0.0
    clamp_hu: tuple[float, float] = (-1000.0, 1000.0)


def _converged(values: list[float], min_delta: float) -> bool:
    """The deepali example's stop test on the last (at most 10) loss values."""
    if len(values) < 2 or min_delta == 0:
        return False
    slope = np.polyfit(np.arange(len(values)), values, 1)[0]
    eps = abs(min_delta * values[-1]) if min_delta < 0 else min_delta
    return abs(slope) < eps


def run_deepali(fixed, moving, geom, device, settings: DeepaliSettings | None = None) -> tuple[np.ndarray, float]:
    """hf-deepali FFD (:class:`DeepaliSettings`) of ``moving`` onto ``fixed`` (``(z, y, x)`` HU on ``geom``);
    returns the pull field ``(3, z, y, x)`` mm (fixed -> moving, components along the array axes z, y, x) on
    ``geom``'s grid and the seconds taken.  deepali's world axes are the array axes here (identity direction,
    spacing of ``geom``), so its ``Axes.WORLD`` flow is the field in mm."""
    from deepali.core import Axes, Grid
    from deepali.data import Image
    from deepali.losses import BSplineBending, new_loss
    from deepali.spatial import FreeFormDeformation, ImageTransformer

    s = settings or DeepaliSettings()
    t0 = time.perf_counter()
    grid = Grid(size=geom.shape[::-1], spacing=geom.spacing[::-1], align_corners=True)
    lo, hi = s.clamp_hu

    def image(a):
        a = (np.clip(a, lo, hi) - lo) / (hi - lo)
        return Image(torch.as_tensor(a, dtype=torch.float32)[None], grid).to(device)

    pyr_f = image(fixed).pyramid(s.levels, dims=s.pyramid_dims)
    pyr_m = image(moving).pyramid(s.levels, dims=s.pyramid_dims)
    ffd = FreeFormDeformation(pyr_f[s.levels - 1].grid(), stride=s.stride).to(device)
    sim = new_loss(s.loss)
    bending = BSplineBending(stride=s.stride)
    takes_mask = s.loss != "NCC"  # deepali's NCC reduces before masking: it takes no voxel mask
    for level in range(s.levels - 1, -1, -1):
        target, source = pyr_f[level], pyr_m[level]
        ffd.grid_(target.grid())
        warp = ImageTransformer(ffd, target=target.grid(), source=source.grid(), padding="zeros")
        src = torch.cat([source.tensor(), torch.ones_like(source.tensor())])[None]  # + ones: the overlap mask
        tgt = target.tensor()[None]
        opt = torch.optim.Adam(ffd.parameters(), lr=s.lr)
        values: list[float] = []
        for _ in range(s.max_steps):
            if _converged(values[-10:], s.min_delta):
                break
            opt.zero_grad()
            w = warp(src)
            mask = w[:, 1:] > 0.9 if takes_mask else None
            loss = sim(w[:, :1], tgt, mask=mask) + s.bending * bending(ffd.data())
            loss.backward()
            for p in ffd.parameters():
                torch.nn.functional.normalize(p.grad, p=2, dim=1, out=p.grad)
            opt.step()
            values.append(loss.item())
    with torch.no_grad():
        flow = ffd.flow(grid).axes(Axes.WORLD)  # (1, 3, z, y, x), components (x, y, z) mm
    u_mm = flow.tensor()[0].flip(0).cpu().numpy().astype(np.float32)  # -> components (z, y, x)
    return u_mm, time.perf_counter() - t0


def run_elastix(fixed, moving, geom, threads: int) -> tuple[np.ndarray, float]:
    """elastix default B-spline map (itk-elastix), SPEC section 7: 4 levels, 10 mm final grid, NCC, 250 iterations."""
    import itk

    t0 = time.perf_counter()
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(max(1, threads))

    def to_itk(a):
        img = itk.image_from_array(np.ascontiguousarray(a.astype(np.float32)))
        img.SetSpacing(tuple(float(s) for s in geom.spacing[::-1]))
        img.SetOrigin(tuple(float(o) for o in geom.origin))
        img.SetDirection(itk.matrix_from_array(geom.direction_matrix))
        return img

    f_img, m_img = to_itk(fixed), to_itk(moving)
    po = itk.ParameterObject.New()
    pm = po.GetDefaultParameterMap("bspline", 4, 10.0)
    pm["Metric"] = ["AdvancedNormalizedCorrelation"]
    pm["MaximumNumberOfIterations"] = ["250"]
    po.AddParameterMap(pm)
    # (the number_of_threads keyword crashes itk-elastix 0.25.4; the global default above sets the threads)
    _, tp = itk.elastix_registration_method(f_img, m_img, parameter_object=po, log_to_console=False)
    with tempfile.TemporaryDirectory(prefix="respmotion-transformix-") as out_dir:  # else it writes into the cwd
        field = itk.transformix_deformation_field(m_img, tp, output_directory=out_dir)
    world = itk.array_from_image(field).astype(np.float64)  # (z, y, x, 3) LPS (x, y, z) mm, fixed -> moving
    u = geom.world_to_axes(world, axis=-1)  # (z, y, x, 3) components (z, y, x)
    return np.moveaxis(u, -1, 0).astype(np.float32), time.perf_counter() - t0


def run_convexadam(fixed, moving, geom, device) -> tuple[np.ndarray, float]:
    """ConvexAdam (``convexadam`` package, ``convex_adam_pt``: MIND-SSC features, its default settings) on a
    ~1.5 mm isotropic resampling of both images (same field of view; each axis rounded to a multiple of its
    6-voxel coarse grid); the field (iso voxels along the array axes, pull) is scaled to mm and resampled back."""
    from convexAdam.convex_adam_MIND import convex_adam_pt

    t0 = time.perf_counter()
    iso = tuple(max(6, 6 * int(round(n * s / 1.5 / 6))) for n, s in zip(geom.shape, geom.spacing))
    g_iso = geom.resized(iso)
    f, m = resample_array(fixed, iso), resample_array(moving, iso)
    disp = convex_adam_pt(f, m, dtype=torch.float32, device=torch.device(device))  # (z, y, x, 3) iso voxels
    u_iso = np.moveaxis(disp, -1, 0) * np.asarray(g_iso.spacing).reshape(3, 1, 1, 1)
    u = resample_array(u_iso.astype(np.float32), geom.shape, antialias=False)
    return u.astype(np.float32), time.perf_counter() - t0


# ----------------------------------------------------------------------------- driver
def _timing(seconds: list[float]) -> dict[str, Any]:
    return {"seconds": statistics.median(seconds), "seconds_repeats": [round(t, 3) for t in seconds],
            "seconds_spread": (max(seconds) - min(seconds)) / statistics.median(seconds) if seconds else None}


def evaluate(cases: Sequence[Case], methods: Sequence[str], device: str = "cpu", threads: int = 2,
             repeats: int = 1, settings: FFDSettings | None = None,
             deepali_settings: DeepaliSettings | None = None) -> dict[str, Any]:
    """Run ``methods`` on ``cases``; ours and deepali are timed ``repeats`` times (metrics of the last run; ours's
    batch also records its peak resident memory, ``rss_peak_mb``, of the last run)."""
    from bench.common import PeakRSS

    out: dict[str, Any] = {"cases": {c.name: {"info": c.info, "shape": list(c.geom.shape),
                                              "spacing_mm": list(c.geom.spacing),
                                              "no_registration": metrics(np.zeros_like(c.gt), c)} for c in cases},
                           "methods": {}}
    for method in methods:
        rec: dict[str, Any] = {"pairs": {}}
        if method == "ours":
            for group in dict.fromkeys(c.group for c in cases):
                sub = [c for c in cases if c.group == group]
                times = []
                for _ in range(max(1, repeats)):
                    with PeakRSS() as mem:
                        fields, per_pair, log = run_ours([c.fixed for c in sub], [c.moving for c in sub],
                                                         sub[0].geom, device, settings)
                    times.append(per_pair)
                rec.setdefault("log", {})[group] = {"level_seconds": [round(lv["seconds"], 2) for lv in log["levels"]],
                                                    "level_iterations": [lv.get("iterations") for lv in log["levels"]],
                                                    "repair": log.get("repair"), "pairs_in_batch": len(sub),
                                                    **mem.to_dict()}
                for c, u in zip(sub, fields):
                    rec["pairs"][c.name] = {**_timing(times), **metrics(u, c)}
        else:
            for c in cases:
                times = []
                for _ in range(max(1, repeats) if method == "deepali" else 1):
                    if method == "deepali":
                        u, dt = run_deepali(c.fixed, c.moving, c.geom, device, deepali_settings)
                    elif method == "elastix":
                        u, dt = run_elastix(c.fixed, c.moving, c.geom, threads)
                    elif method == "convexadam":
                        u, dt = run_convexadam(c.fixed, c.moving, c.geom, device)
                    else:
                        raise ValueError(f"unknown method {method!r} (ours, deepali, elastix, convexadam)")
                    times.append(dt)
                rec["pairs"][c.name] = {**_timing(times), **metrics(u, c)}
        keys = ("seconds", "lung_error_mean_mm", "lung_error_p95_mm", "landmark_error_mm", "folding_percent")
        rec["mean"] = {k: float(np.mean([p[k] for p in rec["pairs"].values()])) for k in keys}
        out["methods"][method] = rec
    if "ours" in out["methods"] and "deepali" in out["methods"]:
        out["acceptance"] = acceptance(out["methods"]["ours"]["pairs"], out["methods"]["deepali"]["pairs"])
    return out


def acceptance(ours: dict, deepali: dict) -> dict[str, Any]:
    """Per pair: ours <= deepali in lung error mean and p95, landmark TRE and every distance band; 0 % folding;
    ours' median time <= 0.25 x deepali's."""
    per = {}
    for name, o in ours.items():
        d = deepali[name]
        bands = {b: (v["tre_mm"] is None or v["tre_mm"] <= d["tre_by_boundary_distance"][b]["tre_mm"])
                 for b, v in o["tre_by_boundary_distance"].items()}
        per[name] = {"lung_mean": o["lung_error_mean_mm"] <= d["lung_error_mean_mm"],
                     "lung_p95": o["lung_error_p95_mm"] <= d["lung_error_p95_mm"],
                     "tre": o["landmark_error_mm"] <= d["landmark_error_mm"], "bands": all(bands.values()),
                     "bands_failed": [b for b, ok in bands.items() if not ok],
                     "folding_zero": o["folding_percent"] == 0.0,
                     "time_ratio": o["seconds"] / d["seconds"], "time": o["seconds"] <= 0.25 * d["seconds"]}
    flags = ("lung_mean", "lung_p95", "tre", "bands", "folding_zero", "time")
    return {"pairs": per, "all": {f: all(p[f] for p in per.values()) for f in flags}}


def _before_outside_fix(s: FFDSettings) -> FFDSettings:
    """``s`` with the stride, iterations, bending weight and schedule and the hard blend of the defaults before
    issue 19's outside-the-lung tuning (docs/registration.md)."""
    return _before_texture(replace(s, stride=(3.0, 8.0, 8.0), iterations=(150, 100, 50), bending_scale=(),
                                   bending_weight=30.0, sliding_ramp_mm=0.0))


def _before_texture(s: FFDSettings) -> FFDSettings:
    """``s`` with one bending weight everywhere: the defaults before issue 19's sixth pass (docs/registration.md);
    the candidates of the third to sixth passes were measured on top of it."""
    return replace(s, bending_texture=(), texture_lung_hu=None)


def _on(base: Callable[[FFDSettings], FFDSettings], **changes: Any) -> Callable[[FFDSettings], FFDSettings]:
    """A tuning candidate: ``base`` (e.g. :func:`_before_texture`) with ``changes`` on top."""
    return lambda s: replace(base(s), **changes)


TUNING_CANDIDATES: dict[str, Callable[[FFDSettings], FFDSettings]] = {
    "default": lambda s: s,
    "lung_region": lambda s: replace(s, sliding_region="lung"),
    "fewer_iterations": lambda s: replace(s, iterations=(100, 60, 30)),
    "bending_1": lambda s: replace(s, bending_weight=1.0),
    "bending_3": lambda s: replace(s, bending_weight=3.0),
    "bending_10": lambda s: replace(s, bending_weight=10.0),
    "bending_100": lambda s: replace(s, bending_weight=100.0),
    "bending_300": lambda s: replace(s, bending_weight=300.0),
    # issue 19, outside-the-lung landmarks (docs/registration.md): each on the settings before that work
    # (`before_outside_fix`); the chosen combination is the default now
    "before_outside_fix": _before_outside_fix,
    "bending_50": _on(_before_outside_fix, bending_weight=50.0),
    "outside_100": _on(_before_outside_fix, bending_weight_outside=100.0),
    "outside_300": _on(_before_outside_fix, bending_weight_outside=300.0),
    "inside_100": _on(_before_outside_fix, bending_weight=100.0, bending_weight_outside=30.0),
    "body_margin_5": _on(_before_outside_fix, body_margin_mm=5.0),
    "stride_3_12_12": _on(_before_outside_fix, stride=(3.0, 12.0, 12.0)),
    "bending_scale_3_1_1": _on(_before_outside_fix, bending_scale=(3.0, 1.0, 1.0)),
    "bending_scale_10_1_1": _on(_before_outside_fix, bending_scale=(10.0, 1.0, 1.0)),
    "bending_scale_3_3_1": _on(_before_outside_fix, bending_scale=(3.0, 3.0, 1.0)),
    "bending_scale_10_3_1": _on(_before_outside_fix, bending_scale=(10.0, 3.0, 1.0)),
    "bending_scale_30_10_1": _on(_before_outside_fix, bending_scale=(30.0, 10.0, 1.0)),
    "scale_10_3_1_fine_75": _on(_before_outside_fix, bending_scale=(10.0, 3.0, 1.0), iterations=(150, 100, 75)),
    "scale_10_3_1_fine_100": _on(_before_outside_fix, bending_scale=(10.0, 3.0, 1.0), iterations=(150, 100, 100)),
    "scale_10_3_1_stride_12": _on(_before_outside_fix, bending_scale=(10.0, 3.0, 1.0), stride=(3.0, 12.0, 12.0)),
    "scale_10_3_1_fine_75_stride_12": _on(_before_outside_fix, 
        bending_scale=(10.0, 3.0, 1.0), iterations=(150, 100, 75), stride=(3.0, 12.0, 12.0)),
    "scale_30_10_1_fine_100_stride_12": _on(_before_outside_fix, 
        bending_scale=(30.0, 10.0, 1.0), iterations=(150, 100, 100), stride=(3.0, 12.0, 12.0)),
    "smooth_0_1_1": _on(_before_outside_fix, smooth_vox=(0.0, 1.0, 1.0)),
    "smooth_05_1_1": _on(_before_outside_fix, smooth_vox=(0.5, 1.0, 1.0)),
    "iterations_150_200_50": _on(_before_outside_fix, iterations=(150, 200, 50)),
    "iterations_250_200_50": _on(_before_outside_fix, iterations=(250, 200, 50)),
    "iterations_150_100_75": _on(_before_outside_fix, iterations=(150, 100, 75)),
    "iterations_150_100_100": _on(_before_outside_fix, iterations=(150, 100, 100)),
    # issue 19, third pass (docs/registration.md): the blend ramp outside the sliding region and the bending weight
    "ramp_0_bending_30": _on(_before_texture, sliding_ramp_mm=0.0, bending_weight=30.0),  # the defaults before
    "ramp_0_bending_50": _on(_before_texture, sliding_ramp_mm=0.0),
    "ramp_6_bending_30": _on(_before_texture, bending_weight=30.0),
    "ramp_4": _on(_before_texture, sliding_ramp_mm=4.0),
    "ramp_8": _on(_before_texture, sliding_ramp_mm=8.0),
    # issue 19, fourth pass: the finest level's precision (every voxel, smaller steps, more iterations)
    "fine_every_voxel": _on(_before_texture, subsample=((1, 1, 1), (1, 2, 2), (1, 1, 1))),
    "fine_lr_0125": _on(_before_texture, lr_mm=(1.0, 0.5, 0.125)),
    "fine_150": _on(_before_texture, iterations=(150, 100, 150)),
    "fine_every_voxel_lr_0125": _on(_before_texture, subsample=((1, 1, 1), (1, 2, 2), (1, 1, 1)),
                                                   lr_mm=(1.0, 0.5, 0.125)),
    # issue 19, fifth pass: small motion (set tune_small) against large; with bending_100 above
    "bending_70": _on(_before_texture, bending_weight=70.0),
    "outside_field_100": _on(_before_texture, bending_weight_outside=100.0),
    # issue 19, sixth pass: bending weight per knot from the fixed image's local texture (texture_poverty); the
    # chosen one (texture_tissue_fine_30) is the default now
    "before_texture": _before_texture,
    "texture_3": _on(_before_texture, bending_texture=(3.0,)),
    "texture_10": _on(_before_texture, bending_texture=(10.0,)),
    "texture_30": _on(_before_texture, bending_texture=(30.0,)),
    "texture_fine_10": _on(_before_texture, bending_texture=(0.0, 0.0, 10.0)),
    "texture_fine_30": _on(_before_texture, bending_texture=(0.0, 0.0, 30.0)),
    "texture_0_10_10": _on(_before_texture, bending_texture=(0.0, 10.0, 10.0)),
    "texture_outside_10": _on(_before_texture, bending_texture=(10.0,), texture_fields="outside"),
    "texture_outside_30": _on(_before_texture, bending_texture=(30.0,), texture_fields="outside"),
    "texture_outside_100": _on(_before_texture, bending_texture=(100.0,), texture_fields="outside"),
    "texture_tissue_10": _on(_before_texture, bending_texture=(10.0,), texture_lung_hu=-500.0),
    "texture_tissue_30": _on(_before_texture, bending_texture=(30.0,), texture_lung_hu=-500.0),
    "texture_tissue_fine_30": _on(_before_texture, bending_texture=(0.0, 0.0, 30.0), texture_lung_hu=-500.0),
    "texture_tissue_fine_100": _on(_before_texture, bending_texture=(0.0, 0.0, 100.0), texture_lung_hu=-500.0),
    "texture_tissue_0_10_30": _on(_before_texture, bending_texture=(0.0, 10.0, 30.0), texture_lung_hu=-500.0),
}


# the deepali example's settings spelled out (examples/ffd/params.yaml); candidates vary one setting each
DEEPALI_EXAMPLE = DeepaliSettings(stride=(8, 8, 5), levels=3, pyramid_dims=("x", "y", "z"), loss="MSE",
                                  bending=0.005, lr=1e-3, max_steps=100, min_delta=-0.01)
DEEPALI_TUNING_CANDIDATES: dict[str, DeepaliSettings] = {
    "example": DEEPALI_EXAMPLE,
    "no_early_stop": replace(DEEPALI_EXAMPLE, min_delta=0.0),
    "lr_2e-3": replace(DEEPALI_EXAMPLE, lr=2e-3),
    "lr_5e-4": replace(DEEPALI_EXAMPLE, lr=5e-4),
    "bending_5e-4": replace(DEEPALI_EXAMPLE, bending=5e-4),
    "bending_5e-2": replace(DEEPALI_EXAMPLE, bending=5e-2),
    "lncc": replace(DEEPALI_EXAMPLE, loss="LNCC"),
    "ncc": replace(DEEPALI_EXAMPLE, loss="NCC"),
    "lr_4e-3": replace(DEEPALI_EXAMPLE, lr=4e-3),
    "lr_4e-3_no_stop": replace(DEEPALI_EXAMPLE, lr=4e-3, min_delta=0.0),
    "lr_1e-2_no_stop": replace(DEEPALI_EXAMPLE, lr=1e-2, min_delta=0.0),
    "no_stop_bending_5e-4": replace(DEEPALI_EXAMPLE, bending=5e-4, min_delta=0.0),
    "no_stop_ncc_bending_5e-4": replace(DEEPALI_EXAMPLE, loss="NCC", bending=5e-4, min_delta=0.0),
    "no_stop_bending_5e-5": replace(DEEPALI_EXAMPLE, bending=5e-5, min_delta=0.0),
}


def tune(cases: Sequence[Case], device: str = "cpu", method: str = "ours",
         names: Sequence[str] | None = None) -> dict[str, Any]:
    """``method`` (ours: :data:`TUNING_CANDIDATES`; deepali: :data:`DEEPALI_TUNING_CANDIDATES`; ``names``: a
    subset) on the tuning cases; score = mean over pairs of lung error mean + p95 + landmark TRE (mm), lower is
    better."""
    if method not in ("ours", "deepali"):
        raise ValueError(f"tuning candidates exist for ours and deepali, not {method!r}")
    table = TUNING_CANDIDATES if method == "ours" else DEEPALI_TUNING_CANDIDATES
    unknown = sorted(set(names or ()) - set(table))
    if unknown:
        raise ValueError(f"unknown {method} tuning candidates {unknown} (known: {', '.join(table)})")
    out: dict[str, Any] = {"method": method, "candidates": {}}
    for name in names or table:
        if method == "ours":
            s, d = TUNING_CANDIDATES[name](FFDSettings()), None
        else:
            s, d = None, DEEPALI_TUNING_CANDIDATES[name]
        rec = evaluate(cases, [method], device, settings=s, deepali_settings=d)["methods"][method]
        score = float(np.mean([p["lung_error_mean_mm"] + p["lung_error_p95_mm"] + p["landmark_error_mm"]
                               for p in rec["pairs"].values()]))
        bands = {b: float(np.mean([p["tre_by_boundary_distance"][b]["tre_mm"] for p in rec["pairs"].values()
                                   if p["tre_by_boundary_distance"][b]["tre_mm"] is not None]))
                 for b in next(iter(rec["pairs"].values()))["tre_by_boundary_distance"]}
        out["candidates"][name] = {"score": score, "settings": repr(s or d), **rec["mean"], "tre_bands_mean": bands,
                                   "pairs": {k: {**{m: p[m] for m in ("seconds", "lung_error_mean_mm",
                                                                      "lung_error_p95_mm", "landmark_error_mm")},
                                                 "tre_bands": {b: v["tre_mm"] for b, v in
                                                               p["tre_by_boundary_distance"].items()}}
                                             for k, p in rec["pairs"].items()}}
    out["best"] = min(out["candidates"], key=lambda k: out["candidates"][k]["score"])
    return out


def cases_for(set_name: str, shape: Sequence[int], seed: int = 0, pairs: Sequence[str] = DEFAULT_PAIRS) -> list[Case]:
    if set_name == "real":
        return [real_case()]
    if set_name == "phantom":
        return phantom_cases(shape, seed, pairs)
    if set_name == "native":
        return native_cases(shape, seed, pairs)
    spec = SETS[set_name]
    return [c for s in spec["seeds"] for c in phantom_cases(shape, s, spec["pairs"])]


def run(device: str = "cpu", shape: Sequence[int] = (50, 256, 256), pairs: Sequence[str] = DEFAULT_PAIRS,
        methods: Sequence[str] = ("ours", "deepali", "elastix"), seed: int = 0, threads: int = 2,
        batch: str = "pairs", set_name: str = "phantom", repeats: int = 1, do_tune: bool = False,
        candidates: Sequence[str] | None = None) -> dict:
    """Benchmark the methods on one set (``phantom``: ``seed`` and ``pairs``; ``tune``, ``heldout``, ``real``);
    returns the JSON-ready record.  ``batch`` is kept for ``python -m bench`` (ours batches a patient's pairs)."""
    from bench.common import environment

    torch.set_num_threads(threads)
    env_before = environment(device)
    cases = cases_for(set_name, shape, seed, pairs)
    out: dict[str, Any] = {"set": set_name, "shape": list(shape), "threads": threads, "repeats": repeats,
                           "ours_batch": batch}
    if do_tune:
        if len(methods) != 1:
            raise ValueError(f"tuning takes one method, got {','.join(methods)}")
        out["tuning"] = tune(cases, device, methods[0], candidates)
    else:
        out.update(evaluate(cases, methods, device, threads, repeats))
    out["environment"] = {"before": env_before, "after": environment(device)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.registration", description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="phantom", choices=("phantom", *SETS, "real", "native"))
    ap.add_argument("--tune", action="store_true",
                    help="score the tuning candidates of --methods ours or deepali on the set")
    ap.add_argument("--candidates", default="", help="with --tune: a comma-separated subset of the candidates")
    ap.add_argument("--shape", default="50,256,256")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--pairs", default=",".join(DEFAULT_PAIRS))
    ap.add_argument("--methods", default="ours,deepali,elastix,convexadam")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args(argv)
    if a.tune and a.set == "heldout":
        ap.error("--tune runs on the tuning set only (--set tune)")
    methods = a.methods.split(",")
    if a.tune:
        methods = ["ours"] if a.methods == ap.get_default("methods") else methods
        if methods not in (["ours"], ["deepali"]):
            ap.error(f"--tune takes --methods ours or --methods deepali, not {a.methods}")
        table = TUNING_CANDIDATES if methods == ["ours"] else DEEPALI_TUNING_CANDIDATES
        unknown = sorted(set(n for n in a.candidates.split(",") if n) - set(table))
        if unknown:
            ap.error(f"--candidates {','.join(unknown)}: not among {','.join(table)}")
    shape = tuple(int(v) for v in a.shape.replace("x", ",").split(","))
    rec = run(a.device, shape, a.pairs.split(","), methods, a.seed, a.threads, "pairs", a.set,
              a.repeats, a.tune, [n for n in a.candidates.split(",") if n] or None)
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
