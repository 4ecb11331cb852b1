"""Registration bench methods: one adapter per method, each taking the fixed and moving image ``(z, y, x)`` HU on
one :class:`~respmotion.core.Geometry` and returning the pull field ``(3, z, y, x)`` mm (fixed -> moving, components
along the array axes z, y, x) with the seconds it took.

* ``ours``: :func:`respmotion.registration.ffd.register` with :class:`~respmotion.registration.config.FFDSettings`
  (all pairs of a patient as one batch, :func:`run_ours`; ``ours-pair``: the same, one pair at a time);
* ``deepali``: the shared yardstick, ``register_deepali`` of ``shared/anchors/deepali_ffd.py`` (hf-deepali FFD set
  up for thoracic 4D-CT; :func:`run_anchor_deepali`), when that file exists;
* ``deepali-example``: hf-deepali FFD as its own ``examples/ffd`` registers a pair (:class:`DeepaliSettings`,
  :func:`run_deepali`);
* ``elastix`` (itk-elastix B-spline) and ``convexadam`` (MIND-SSC ConvexAdam).

The baselines need the ``bench`` extra (hf-deepali, itk-elastix, convexadam).
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from respmotion.anatomy import body_mask, sliding_region
from respmotion.core.ops import resample_array
from respmotion.data.intensity import HU_WINDOW, HUWindow
from respmotion.registration.bspline import blend_weight
from respmotion.registration.config import FFDSettings
from respmotion.registration.ffd import register

METHODS = ("ours", "ours-pair", "deepali", "deepali-example", "elastix", "convexadam")
ANCHOR = Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "deepali_ffd.py"


def run_ours(fixed, moving, geom, device, settings: FFDSettings | None = None) -> tuple[list[np.ndarray], float, dict]:
    """Register all given pairs (lists of ``(z, y, x)`` HU arrays on ``geom``) as one batch, masks included in the
    time; returns the dense pull fields ``(3, z, y, x)`` mm, the amortised seconds per pair and the optimiser log
    (seconds per level, folding repair record)."""
    s = settings or FFDSettings()
    t0 = time.perf_counter()
    body = np.stack([body_mask(f) for f in fixed])
    weight = (np.stack([blend_weight(sliding_region(f, b, geom, s.sliding_region), geom.spacing, s.sliding_ramp_mm)
                        for f, b in zip(fixed, body)]) if s.sliding else None)
    to = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device)  # noqa: E731
    field, log = register(to(np.stack(fixed)), to(np.stack(moving)), to(body), geom.spacing, s,
                          inside_weight=None if weight is None else to(weight))
    u = [field.dense(b).cpu().numpy() for b in range(len(fixed))]
    dt = time.perf_counter() - t0
    return u, dt / len(fixed), log


@functools.cache
def load_anchor(path: Path = ANCHOR) -> Callable:
    """``register_deepali(fixed, moving, spacing) -> (3, z, y, x) mm`` pull field from the anchor file at ``path``
    (loaded from its path, not from ``sys.path``; once per process, not once per pair)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the deepali anchor is not there (use --methods deepali-example)")
    spec = importlib.util.spec_from_file_location("respmotion_bench_deepali_anchor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.register_deepali


def run_anchor_deepali(fixed, moving, geom) -> tuple[np.ndarray, float]:
    """The anchor's hf-deepali FFD (:func:`load_anchor`) of ``moving`` onto ``fixed`` (``(z, y, x)`` HU on
    ``geom``); returns its pull field ``(3, z, y, x)`` mm float32 and the seconds taken (the file's loading
    excluded)."""
    register_deepali = load_anchor()
    t0 = time.perf_counter()
    u = register_deepali(fixed, moving, tuple(float(v) for v in geom.spacing))
    return np.asarray(u, dtype=np.float32), time.perf_counter() - t0


@dataclass(frozen=True)
class DeepaliSettings:
    """hf-deepali FFD as its own example registers a pair (``examples/ffd`` of BioMedIA/deepali: ``params.yaml``,
    ``pairwise.py``): intensities clipped to ``hu_window`` and scaled to [0, 1]; a Gaussian pyramid of ``levels``
    (downsampled along ``pyramid_dims``, grid corners aligned); a FreeFormDeformation made on the coarsest level's
    grid with control points every ``stride`` voxels (x, y, z) *of the current level* (the control grid is
    subdivided at each finer level, so its mm spacing halves); loss = ``loss`` (a ``deepali.losses`` name; image
    terms on the overlap mask where the loss takes a voxel mask, as the example does) + ``bending`` x
    ``BSplineBending``; a new Adam per level, ``lr`` in deepali's normalised units (the image spans [-1, 1] on each
    axis), gradient normalised to unit length per control point before each step (the example's hook); at most
    ``max_steps`` steps a level, stopping when the least-squares slope of the last 10 loss values is below
    ``|min_delta| x`` the loss (``min_delta`` < 0: relative, the example's -0.01; 0: never).  The defaults are the
    example's except ``bending`` and ``min_delta``, chosen on the tuning set (``deepali-example`` in
    ``bench/registration_candidates.yaml``)."""

    stride: tuple[int, int, int] = (8, 8, 5)
    levels: int = 3
    pyramid_dims: tuple[str, ...] = ("x", "y", "z")
    loss: str = "MSE"
    bending: float = 5e-4
    lr: float = 1e-3
    max_steps: int = 100
    min_delta: float = 0.0
    hu_window: HUWindow = HU_WINDOW


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
    lo, hi = s.hu_window

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
    """elastix default B-spline map (itk-elastix): 4 levels, 10 mm final grid, NCC, 250 iterations; ``threads``
    its worker threads.  Returns the pull field ``(3, z, y, x)`` mm and the seconds taken."""
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
