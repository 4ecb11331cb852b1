"""Registration benchmark: ours vs hf-deepali FFD (SPEC section 7 settings) vs elastix, same pairs, same run.

    python -m bench.registration [--shape 50,256,256] [--device cpu|cuda] [--pairs ref_50,step_20,step_70]
                                 [--methods ours,deepali,elastix] [--seed 0] [--threads 2] [--batch study|pairs]

Prints one JSON document: per method and pair the wall time, peak resident memory, lung DVF error (mean / p95 mm,
lung voxels of the fixed phase, against the phantom's exact pull field), landmark error (reference landmarks moved
with the inverse of the pull, split by the phantom's ``in_lung`` flag), % voxels with Jacobian determinant <= 0;
plus the environment (threads, load average before/after: the CPU may be shared).

Ours registers all 19 pairs of the phantom study (``ref_10``..``ref_90``, ``step_00``..``step_90``) as one batch, as
``respmotion register`` does (time per pair = batch time / 19, body and lung masks and the dense fields included);
the table compares the selected pairs, and ``all_study_pairs`` averages ours over all 19.  ``--batch pairs``
batches only the selected pairs.  Baselines need the ``bench``
extra (``pip install hf-deepali==0.6.5 itk-elastix``); the core package never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from respmotion.core import DisplacementField, Geometry
from respmotion.core import warp as W
from respmotion.evaluation.landmarks import landmark_error
from respmotion.io.atomic import read_json
from respmotion.io.layout import StudyDir
from respmotion.registration.bspline import ControlGrid, dense_tensor
from respmotion.registration.ffd import FFDSettings, register
from respmotion.anatomy import body_mask, lung_mask
from respmotion.registration.quality import masked_ncc

DEFAULT_PAIRS = ("ref_50", "step_20", "step_70")
STUDY_PAIRS = tuple(f"ref_{k}" for k in range(10, 100, 10)) + tuple(f"step_{k:02d}" for k in range(0, 100, 10))


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


def _metrics(u: np.ndarray, sd: StudyDir, name: str, geom: Geometry) -> dict[str, Any]:
    fixed_k, moving_k = _pair_phases(name)
    kind, k = name.split("_")
    gt = sd.load_gt(kind, int(k)).array
    lung = np.load(sd.mask_path("lung", fixed_k)) > 0
    err = np.linalg.norm(u - gt, axis=0)[lung]
    lm = read_json(sd.landmarks_path)
    ref = np.asarray(lm["phases"][f"{moving_k:02d}"])
    tgt = np.asarray(lm["phases"][f"{fixed_k:02d}"])
    inside = np.asarray(lm["in_lung"], bool)
    le = landmark_error(DisplacementField(u.astype(np.float32), geom), ref, tgt).errors_mm
    le0 = np.linalg.norm(tgt - ref, axis=1)
    fold = W.folding_fraction(torch.as_tensor(u)[None], geom.spacing)
    return {
        "lung_error_mean_mm": float(err.mean()), "lung_error_p95_mm": float(np.percentile(err, 95)),
        "landmark_error_mm": float(le.mean()), "landmark_error_inside_mm": float(le[inside].mean()),
        "landmark_error_outside_mm": float(le[~inside].mean()) if (~inside).any() else None,
        "landmarks_n": int(len(le)), "landmarks_inside_n": int(inside.sum()),
        "landmark_error_none_mm": float(le0.mean()),
        "lung_error_none_mean_mm": float(np.linalg.norm(gt, axis=0)[lung].mean()),
        "folding_percent": 100.0 * fold,
    }


# ----------------------------------------------------------------------------- methods
def run_ours(fixed, moving, geom, device, settings: FFDSettings | None = None) -> tuple[list[np.ndarray], float, dict]:
    """Register all given pairs as one batch (masks included in the time); returns the dense fields, the
    amortised seconds per pair and the optimiser log (seconds per level, folding repair record)."""
    s = settings or FFDSettings()
    t0 = time.perf_counter()
    body = np.stack([body_mask(f) for f in fixed])
    lung = np.stack([lung_mask(f, b) for f, b in zip(fixed, body)]) if s.sliding else None
    to = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device)  # noqa: E731
    coef, log = register(to(np.stack(fixed)), to(np.stack(moving)), to(body), geom.spacing, s,
                         lung=None if lung is None else to(lung))
    grid = ControlGrid(geom.shape, s.stride)
    u = [dense_tensor(coef[b:b + 1], grid, None if lung is None else to(lung[b:b + 1]))[0].cpu().numpy()
         for b in range(len(fixed))]
    dt = time.perf_counter() - t0
    return u, dt / len(fixed), log


def run_deepali(fixed, moving, geom, device) -> tuple[np.ndarray, float]:
    """hf-deepali FreeFormDeformation, SPEC section 7: control points every (8, 8, 3) voxels (x, y, z), 3 levels
    (finest at full resolution), global NCC on the fixed body mask, bending energy weight 1, Adam 100/60/40 steps
    with lr 0.5/0.3/0.15 mm (control points parametrised in mm)."""
    from deepali.core import Grid
    from deepali.data import Image
    from deepali.losses import BSplineBending
    from deepali.spatial import FreeFormDeformation, ImageTransformer

    t0 = time.perf_counter()
    z, y, x = geom.shape
    sz, sy, sx = geom.spacing
    grid = Grid(shape=(z, y, x), spacing=(sx, sy, sz), align_corners=True)
    stride = (8, 8, 3)
    probe = FreeFormDeformation(grid, stride=stride)
    scale = torch.tensor([2.0 / ((n - 1) * s) for n, s in ((x, sx), (y, sy), (z, sz))], device=device)
    p_mm = torch.zeros((1, *probe.data_shape), device=device, requires_grad=True)
    view = (1, 3) + (1,) * (p_mm.ndim - 2)
    ffd = FreeFormDeformation(grid, stride=stride, params=lambda *a: p_mm * scale.view(view)).to(device)
    bending = BSplineBending(stride=stride)
    fx = Image(torch.as_tensor(np.clip(fixed, -1000, 1000))[None], grid).to(device)
    mv = Image(torch.as_tensor(np.clip(moving, -1000, 1000))[None], grid).to(device)
    mk = Image(torch.as_tensor(body_mask(fixed).astype(np.float32))[None], grid).to(device)
    pyr_f, pyr_m, pyr_k = fx.pyramid(3), mv.pyramid(3), mk.pyramid(3)
    for level, steps, lr in ((2, 100, 0.5), (1, 60, 0.3), (0, 40, 0.15)):
        target, source, mask = pyr_f[level], pyr_m[level], pyr_k[level]
        warp = ImageTransformer(ffd, target=target.grid(), source=source.grid(), padding="border")
        opt = torch.optim.Adam([p_mm], lr=lr)
        src = source.tensor()[None]
        tgt = target.tensor()[None]
        msk = mask.tensor()[None]
        for _ in range(steps):
            opt.zero_grad()
            ffd.update()
            ncc = masked_ncc(warp(src)[:, 0], tgt[:, 0], msk[:, 0])  # deepali's ncc_loss masks after reducing
            loss = (1.0 - ncc**2).sum() + 1.0 * bending(ffd.data())
            loss.backward()
            opt.step()
    with torch.no_grad():
        ffd.update()
        u_norm = ffd.disp(grid)  # (1, 3, z, y, x) normalised, channels (x, y, z)
    u_mm = (u_norm[0] / scale.view(3, 1, 1, 1)).flip(0).cpu().numpy()  # -> (z, y, x) mm
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


# ----------------------------------------------------------------------------- driver
def run(device: str = "cpu", shape: Sequence[int] = (50, 256, 256), pairs: Sequence[str] = DEFAULT_PAIRS,
        methods: Sequence[str] = ("ours", "deepali", "elastix"), seed: int = 0, threads: int = 2,
        batch: str = "study") -> dict:
    """Benchmark the methods on phantom pairs; returns the JSON-ready record."""
    from bench.common import PeakRSS, environment

    torch.set_num_threads(threads)
    env_before = environment(device)
    sd = _phantom_study(shape, seed)
    geom = sd.load_phase(0).geometry
    fixed = [sd.load_phase(_pair_phases(n)[0]).array for n in pairs]
    moving = [sd.load_phase(_pair_phases(n)[1]).array for n in pairs]
    out: dict[str, Any] = {"shape": list(shape), "spacing_mm": list(geom.spacing), "pairs": list(pairs),
                           "phantom_seed": seed, "ours_batch": batch, "motion": sd.info().get("motion"), "methods": {}}
    out["no_registration"] = {n: _metrics(np.zeros((3, *geom.shape), np.float32), sd, n, geom) for n in pairs}
    for method in methods:
        rec: dict[str, Any] = {"pairs": {}}
        with PeakRSS() as mem:
            if method == "ours":
                # one batch with every pair of the study (ref_XX and step_XX, as `respmotion register` does);
                # the time is per pair, amortised; the table compares the selected pairs
                names = list(STUDY_PAIRS) if batch == "study" else list(pairs)
                f_all = [sd.load_phase(_pair_phases(n)[0]).array for n in names]
                m_all = [sd.load_phase(_pair_phases(n)[1]).array for n in names]
                all_fields, per_pair, log = run_ours(f_all, m_all, geom, device)
                fields = [all_fields[names.index(n)] for n in pairs]
                times = [per_pair] * len(pairs)
                rec["batch_pairs"] = len(names)
                rec["optimiser_seconds"] = [round(lv["seconds"], 2) for lv in log["levels"]]
                rec["repair"] = log.get("repair")
                if batch == "study":
                    every = [_metrics(u, sd, n, geom) for n, u in zip(names, all_fields)]
                    rec["all_study_pairs"] = {k: float(np.mean([m[k] for m in every if m[k] is not None]))
                                              for k in ("lung_error_mean_mm", "lung_error_p95_mm",
                                                        "landmark_error_inside_mm", "landmark_error_outside_mm",
                                                        "folding_percent")}
                    rec["all_study_pairs"]["folding_percent_max"] = float(max(m["folding_percent"] for m in every))
                del all_fields, f_all, m_all
            else:
                fields, times = [], []
                for f, m in zip(fixed, moving):
                    u, dt = run_deepali(f, m, geom, device) if method == "deepali" else run_elastix(f, m, geom, threads)
                    fields.append(u)
                    times.append(dt)
        for n, u, dt in zip(pairs, fields, times):
            rec["pairs"][n] = {"seconds": dt, **_metrics(u, sd, n, geom)}
        keys = ("seconds", "lung_error_mean_mm", "lung_error_p95_mm", "landmark_error_mm",
                "landmark_error_inside_mm", "landmark_error_outside_mm", "folding_percent")
        rec["mean"] = {k: float(np.mean([p[k] for p in rec["pairs"].values() if p[k] is not None])) for k in keys}
        rec["memory"] = mem.to_dict()
        out["methods"][method] = rec
    out["environment"] = {"before": env_before, "after": environment(device), "loadavg_after": list(os.getloadavg())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.registration", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="50,256,256")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--pairs", default=",".join(DEFAULT_PAIRS))
    ap.add_argument("--methods", default="ours,deepali,elastix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="study", choices=("study", "pairs"),
                    help="ours: one batch with all 19 pairs of the study (default) or only the selected pairs")
    a = ap.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.replace("x", ",").split(","))
    rec = run(a.device, shape, a.pairs.split(","), a.methods.split(","), a.seed, a.threads, a.batch)
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
