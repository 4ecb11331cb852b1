"""Registration bench cases: phantom pairs with their exact motion, the same resampled to a clinical CT's grid, and
the small real lung CT made into a pair with a known field.  Sets of cases by name: :data:`SETS`, :func:`cases_for`.

Every case carries the truth the metrics need (:class:`Case`): the pull field ``gt`` ``(3, z, y, x)`` mm of the fixed
image's grid, the fixed phase's true lung mask, and landmarks (LPS mm) in both images.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from respmotion.core import Geometry
from respmotion.core import warp as W
from respmotion.core.ops import resample_array
from respmotion.io.atomic import read_json
from respmotion.io.layout import StudyDir, next_phase

DEFAULT_PAIRS = ("ref_50", "step_20", "step_70")
SETS = {
    "tune": {"seeds": (5, 6, 9), "pairs": ("ref_20", "ref_50")},
    "tune_small": {"seeds": (5, 6, 9), "pairs": ("step_00", "step_60")},  # 0.3-1.4 mm lung mean: small motion
    # held out: patients no setting was chosen on (seeds 0 and 4 were reported on before; 12, 13 are new)
    "heldout": {"seeds": (12, 13), "pairs": ("ref_20", "ref_50")},
}
TUNING_SETS = ("tune", "tune_small")  # the only sets `--tune` may run on
SET_NAMES = ("phantom", *SETS, "real", "native")
NATIVE_SHAPE = (141, 512, 512)  # a clinical thoracic CT's grid (POPI: 512x512x141)
REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "elastix-lung-ct-small"


def _pair_phases(name: str) -> tuple[str, int, int, int]:
    """``ref_XX`` -> (``ref``, XX, fixed XX, moving 0); ``step_XX`` -> (``step``, XX, fixed the phase after XX,
    moving XX)."""
    kind, k = name.split("_")
    k = int(k)
    return (kind, k, k, 0) if kind == "ref" else (kind, k, next_phase(k), k)


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
    """Phantom patient ``seed`` at ``shape`` (z, y, x voxels; written once to ``$RESPMOTION_BENCH_CACHE`` or the
    temporary folder and reused), one case per pair name (``ref_XX``, ``step_XX``), grouped by patient."""
    sd = _phantom_study(shape, seed)
    geom = sd.load_phase(0).geometry
    lm = read_json(sd.landmarks_path)
    cases = []
    for n in pairs:
        kind, k, fk, mk = _pair_phases(n)
        cases.append(Case(f"seed{seed}_{n}", f"seed{seed}", sd.load_phase(fk).array, sd.load_phase(mk).array, geom,
                          sd.load_gt(kind, k).array, np.load(sd.mask_path("lung", fk)) > 0,
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


def cases_for(set_name: str, shape: Sequence[int], seed: int = 0, pairs: Sequence[str] = DEFAULT_PAIRS) -> list[Case]:
    """The cases of a set (:data:`SET_NAMES`): ``phantom`` and ``native`` take ``seed`` and ``pairs``; ``real`` is
    one case; the others are :data:`SETS` at ``shape``."""
    if set_name == "real":
        return [real_case()]
    if set_name == "phantom":
        return phantom_cases(shape, seed, pairs)
    if set_name == "native":
        return native_cases(shape, seed, pairs)
    spec = SETS[set_name]
    return [c for s in spec["seeds"] for c in phantom_cases(shape, s, spec["pairs"])]
