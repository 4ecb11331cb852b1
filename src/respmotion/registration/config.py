"""Settings of registration: the optimiser's (:class:`FFDSettings`) and the ``respmotion register`` stage's
(:class:`RegisterConfig`, which holds an ``FFDSettings`` as ``ffd``).  Loading and ``key=value`` overrides:
:mod:`respmotion.config`.  What each setting does and when to change it: ``docs/registration.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Optional, Sequence

from ..anatomy.masks import BODY_THRESHOLD_HU, LUNG_THRESHOLD_HU
from ..anatomy.sliding import REGIONS
from ..data.intensity import HU_WINDOW, HUWindow, check_hu_window


@dataclass
class FFDSettings:
    """Settings of :func:`respmotion.registration.ffd.register` (defaults: the tuned ones, docs/registration.md).

    Voxel counts (``stride``, ``levels``) are voxels of a ``reference_shape`` grid over the image's field of view
    (:meth:`for_shape`), axes in array order (z, y, x).  Per-level tuples run from the coarsest level to the
    finest; ``bending_scale`` and ``bending_texture`` are aligned at the finest level (their last entry; levels
    coarser than the tuple reaches take its first entry).
    """

    stride: tuple[float, float, float] = (3.0, 12.0, 12.0)  # control point spacing, voxels (z, y, x)
    levels: tuple[tuple[float, float, float], ...] = ((4, 4, 4), (2, 2, 2), (1, 1, 1))  # downsampling per level
    reference_shape: tuple[int, int, int] | None = (50, 256, 256)  # None: voxels of the image itself
    iterations: tuple[int, ...] = (100, 60, 50)  # Adam steps per level
    lr_mm: tuple[float, ...] = (1.0, 0.5, 0.4)  # Adam step per level, mm
    subsample: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 2, 2), (1, 2, 2))  # similarity voxel stride per level
    bending_weight: float = 10.0  # bending energy (mm^-2) weight
    bending_weight_outside: float | None = None  # sliding: the outside field's bending weight (None: bending_weight)
    # both bending weights times this per level: stiff coarse levels keep texture-poor regions (abdomen below the
    # diaphragm, chest wall) from taking a wrong large-scale motion (empty: 1 everywhere)
    bending_scale: tuple[float, ...] = (10.0, 3.0, 1.0)
    # per level: each knot's bending weight times 1 + strength * (its lack of texture in [0, 1],
    # respmotion.registration.texture.texture_poverty) (empty or 0: one weight everywhere; e.g. (0, 0, 30) with
    # texture_air_hu -500 for small motion)
    bending_texture: tuple[float, ...] = ()
    texture_fields: str = "both"  # sliding: both | outside (the inside field keeps one weight everywhere)
    # knots whose blurred HU is below this (air: aerated lung, outside the body) keep one weight (None: none do)
    texture_air_hu: float | None = None
    jacobian_weight: float = 1.0e2  # penalty on Jacobian determinants below jacobian_min at the knots
    jacobian_min: float = 0.2
    hu_window: HUWindow = HU_WINDOW  # both images clipped to this HU window before the similarity
    smooth_vox: tuple[float, float, float] = (0.0, 0.0, 0.0)  # Gaussian sigma (voxels) on both images
    body_margin_mm: float = 0.0  # similarity weight: the fixed body mask dilated by this many mm (box, per axis)
    sliding: bool = True  # two fields, inside and outside the sliding region, each with its own regulariser
    sliding_region: str = "cavity"  # cavity | lung: the inside field's region (respmotion.anatomy.sliding_region)
    sliding_ramp_mm: float = 6.0  # the inside field's weight falls to 0 over this distance outside the region
    repair_folding: bool = True  # after the last level: remove every det <= 0 voxel (registration.folding)
    # early stop of a level: every `stop_window` iterations, stop when no pair's mean loss over the window fell by
    # more than `stop_tol` x its (1 - NCC) since the previous window (0: run every iteration)
    stop_tol: float = 0.0
    stop_window: int = 10
    # CPU: pairs of a batch split over this many single-threaded workers (0: torch.get_num_threads()): one
    # worker per core, no OpenMP barriers between cores
    workers: int = 0
    seed: int = 0  # the similarity's voxel subset offsets are drawn from this

    RENAMED: ClassVar[dict[str, str]] = {"clip_hu": "hu_window", "texture_lung_hu": "texture_air_hu"}  # older saved configs

    def for_shape(self, shape: Sequence[int]) -> "FFDSettings":
        """These settings for an image of ``shape`` (z, y, x) voxels.

        ``stride`` and ``levels`` count voxels of a ``reference_shape`` grid (the defaults were chosen at
        50x256x256).  Along an axis where the image has more voxels, both are multiplied by
        ``shape / reference_shape``: the pyramid's finest level then has about the reference's voxels and the
        control points the same spacing relative to the field of view; the field is still evaluated at every voxel
        of the image.  Axes with fewer voxels, ``reference_shape`` None, and a result of this method are left as
        they are.

        Use::

            s = FFDSettings().for_shape((141, 512, 512))  # stride (8.46, 24, 24), levels (11.28, 8, 8) ... (2.82, 2, 2)
        """
        if self.reference_shape is None:
            return self
        r = [max(1.0, n / m) for n, m in zip(shape, self.reference_shape)]
        return replace(self, stride=tuple(float(a * v) for a, v in zip(self.stride, r)),
                       levels=tuple(tuple(float(f * v) for f, v in zip(lv, r)) for lv in self.levels),
                       reference_shape=None)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        n = len(self.levels)
        if not (len(self.iterations) == len(self.lr_mm) == len(self.subsample) == n):
            raise ValueError(f"levels ({n}), iterations, lr_mm and subsample need one entry per level")
        if self.reference_shape is not None and (len(self.reference_shape) != 3 or min(self.reference_shape) < 1):
            raise ValueError(f"reference_shape must be 3 voxel counts >= 1 (z, y, x) or None, "
                             f"got {self.reference_shape}")
        if self.texture_fields not in ("both", "outside"):
            raise ValueError(f"texture_fields must be both or outside, got {self.texture_fields!r}")
        if any(v < 0 for v in self.bending_texture):
            raise ValueError(f"bending_texture must be >= 0 per level, got {self.bending_texture}")
        check_hu_window(self.hu_window, "ffd.hu_window")
        if self.sliding_region not in REGIONS:
            raise ValueError(f"sliding_region must be one of {', '.join(REGIONS)}, got {self.sliding_region!r}")


@dataclass
class RegisterConfig:
    """Where to read/write, which pairs, how to shard, and the optimiser settings (``ffd.*``)."""

    data: str = ""  # cohort root (layout of respmotion.io.layout)
    out: str = ""  # output root: <out>/<patient>/<study>/<pair>.npz (+ .json quality record)
    pairs: str = "both"  # ref | step | both
    patients: tuple[str, ...] = ()  # register only these patients' studies (default: every patient)
    reference: int = 0  # reference phase (percent) of the ref_XX pairs
    rank: Optional[int] = None  # shard index; default torchrun's RANK or 0
    world_size: Optional[int] = None  # number of shards; default torchrun's WORLD_SIZE or 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N (respmotion.runtime.resolve_device)
    batch_size: int = 0  # pairs per optimiser batch (0: as many of a study's pairs as fit in memory, auto_batch_size)
    threads: int = 0  # torch CPU threads (0: the CPUs this process may use, respmotion.runtime.use_threads)
    body_threshold_hu: float = BODY_THRESHOLD_HU  # body masks: tissue above, air below
    lung_threshold_hu: float = LUNG_THRESHOLD_HU  # lung masks for sliding (computed when the study has none)
    coef_dtype: str = "float32"  # float32 | float16 storage of control points
    write_masks: bool = True  # write body masks to <out>/<patient>/<study>/masks/body_XX.npy
    ffd: FFDSettings = field(default_factory=FFDSettings)

    def check(self) -> None:
        if self.pairs not in ("ref", "step", "both"):
            raise ValueError(f"pairs must be ref, step or both, got {self.pairs!r}")
        if self.coef_dtype not in ("float32", "float16"):
            raise ValueError(f"coef_dtype must be float32 or float16, got {self.coef_dtype!r}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {self.batch_size}")
        self.ffd.check()
