"""Autoencoder runs: config, data, motion prior and ``train_autoencoder`` (the engine task is
:mod:`.autoencoder_task`; evaluation :mod:`.autoencoder_eval`).

``kind="image"``: CT volumes of every phase (HU -> [-1, 1]), loss :class:`~respmotion.models.losses.LPELoss`.
``kind="dvf"``: displacement fields of a field source (mm -> mm / 10), VAE with
:class:`~respmotion.models.losses.DVFLoss` + KL.  By default (``data.motion_prior="regressed"``) the
VAE learns the residual of each target to what the training patients' fields predict for the CT's lung
features, divided by the target's scale (:mod:`respmotion.models.prior`), saved as ``<run>/motion_prior.npy`` and recorded (path,
sha256) in every checkpoint's ``extra["motion_prior"]``.  Patients are split train/val/test with a fixed
seed; the split is stored in the run folder (``split.json``) and in every checkpoint, and
evaluation uses the stored test patients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from torch.utils.data import Dataset

from ..anatomy.features import LUNG_FEATURES
from ..io.layout import PHASES
from ..models.autoencoder import Autoencoder, AutoencoderNetConfig
from .autoencoder_task import AutoencoderTask, DVFLossConfig, ImageLossConfig
from ..models.prior import JSON as PRIOR_JSON
from ..models.prior import NPY as PRIOR_NPY
from ..models.prior import PRIOR_MODES, MotionPrior
from . import distributed as D
from .data import FieldDataset, VolumeDataset, field_source
from .engine import FitResult, TrainConfig
from .run import Run, run_training
from .splits import SPLIT_RENAMED, Split, SplitSettings, split_cohort, studies_of

log = logging.getLogger("respmotion")


# ---------------------------------------------------------------------------- config
@dataclass
class AEDataConfig:
    root: str = ""  # cohort folder (respmotion.io.layout)
    patient_split: SplitSettings = field(default_factory=SplitSettings)  # train, val, test (patient level)
    phases: list[int] = field(default_factory=lambda: list(PHASES))  # image AE: phases used
    field_source: str = "gt_step"  # DVF AE: gt_step | gt_ref (phantom) | reg_ref@DIR | reg_step@DIR
    # DVF AE: what it codes (respmotion.models.prior; written to <run>/motion_prior.npy): "regressed" = the residual
    # to the training patients' fields regressed on the CT's lung features, divided by the target's scale;
    # "scaled" = the residual to their mean field, divided so; "mean" = unscaled; "none" = the full field
    motion_prior: str = "regressed"

    RENAMED: ClassVar[dict[str, str]] = SPLIT_RENAMED


@dataclass
class AutoencoderRunConfig:
    kind: str = "image"  # image | dvf
    data: AEDataConfig = field(default_factory=AEDataConfig)
    # architecture; None channel settings take the kind's default (image 1->3 AE, dvf 3->9 VAE); model.kind
    # is set from kind
    model: AutoencoderNetConfig = field(default_factory=AutoencoderNetConfig)
    image_loss: ImageLossConfig = field(default_factory=ImageLossConfig)
    dvf_loss: DVFLossConfig = field(default_factory=DVFLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs"  # runs go to <out>/autoencoder_<kind>/<timestamp>/
    run_dir: str = ""  # explicit run folder instead (resume uses the checkpoint's folder)
    latent_scale_items: int = 16  # training items encoded to estimate the latent scale


def resolve(cfg: AutoencoderRunConfig) -> AutoencoderRunConfig:
    """Fill the kind-dependent ``None`` model settings (and ``model.kind``) so the saved config states them."""
    cfg.model = cfg.model.resolved(cfg.kind)
    return cfg


# ---------------------------------------------------------------------------- data
def make_dataset(cfg: AutoencoderRunConfig, patients: tuple[str, ...] | list[str], root: str | None = None,
                 prior: MotionPrior | None = None) -> Dataset:
    """Items of ``patients``; DVF items are residuals to ``prior`` when one is given (else full fields)."""
    studies = studies_of(root or cfg.data.root, patients)
    if cfg.kind == "image":
        return VolumeDataset(studies, cfg.data.phases)
    return FieldDataset(studies, field_source(cfg.data.field_source), prior)


def build_prior(cfg: AutoencoderRunConfig, split: Split) -> MotionPrior:
    """The prior of the training patients' fields (the DVF AE's own training targets) in ``data.motion_prior``
    mode; a regressed prior reads each training patient's lung features from its reference CT."""
    ds = make_dataset(cfg, split.train)
    meta = {"patients": list(split.train), "field_source": cfg.data.field_source, "data": str(Path(cfg.data.root).resolve())}
    features = None
    if cfg.data.motion_prior == "regressed":
        features = {ds.items[i][0].key: ds.features(i) for i in range(len(ds))}
    return MotionPrior.from_fields(lambda: (ds.raw(i) for i in range(len(ds))), meta, cfg.data.motion_prior, features,
                                   LUNG_FEATURES)


def _prior_for_run(cfg: AutoencoderRunConfig, split: Split, run_dir: Path, info) -> MotionPrior | None:
    """Compute (rank 0) and save the prior in ``run_dir``, or reuse the one a resumed run wrote."""
    if cfg.kind != "dvf" or cfg.data.motion_prior == "none":
        return None
    if cfg.data.motion_prior not in PRIOR_MODES:
        raise ValueError(f"data.motion_prior must be one of {PRIOR_MODES}, got {cfg.data.motion_prior!r}")
    if info.is_main and not (run_dir / PRIOR_JSON).exists():  # the .json is written last
        run_dir.mkdir(parents=True, exist_ok=True)
        build_prior(cfg, split).save(run_dir)
    D.barrier(info)
    prior = MotionPrior.load(run_dir / PRIOR_NPY)
    if sorted(prior.meta.get("patients") or []) != sorted(split.train):
        raise ValueError(f"{run_dir / PRIOR_NPY}: computed from patients {prior.meta.get('patients')}, "
                         f"not this run's training patients {list(split.train)}")
    return prior


def _check_resumable(path: Path, cfg: AutoencoderRunConfig) -> None:
    """A one-line error naming ``path`` when it is unreadable, of another model kind, or holds weights
    that do not fit the run's model (checked before anything in the run folder is written)."""
    from ..io.checkpoint import load_checkpoint
    from ..io.torchfile import load_state

    ckpt = load_checkpoint(path)
    task = str(ckpt.get("task", ""))
    if task != f"autoencoder_{cfg.kind}":
        raise ValueError(f"{path}: a checkpoint of task {task!r}, cannot resume a {cfg.kind!r} autoencoder run")
    load_state(Autoencoder(cfg.model), ckpt.get("model"), path)


# ---------------------------------------------------------------------------- train
def train_autoencoder(
    cfg: AutoencoderRunConfig, resume: str | Path | None = None, init: str | Path | None = None
) -> FitResult:
    """Train an autoencoder; ``resume`` = a run folder or checkpoint to continue exactly,
    ``init`` = a checkpoint whose weights start a new run (its config kept as ``prev_config.yaml``).

    Run under ``torchrun`` for DDP; every rank calls this function.
    """
    if cfg.kind not in ("image", "dvf"):
        raise ValueError(f"kind must be image or dvf, got {cfg.kind!r}")
    if not cfg.data.root:
        raise ValueError("no dataset folder given (data.root / --data)")
    cfg = resolve(cfg)
    return run_training(f"autoencoder_{cfg.kind}", cfg.out, cfg.run_dir, cfg.train.device, resume,
                        lambda run: _train_in(cfg, run, init), lambda ckpt: _check_resumable(ckpt, cfg))


def _train_in(cfg: AutoencoderRunConfig, run: Run, init: str | Path | None) -> FitResult:
    """The body of :func:`train_autoencoder` once the run folder is owned."""
    split = run.split(split_cohort(cfg.data.root, cfg.data.patient_split.ratios, cfg.data.patient_split.seed))
    if not split.train:
        raise ValueError(f"{cfg.data.root}: no training patients")
    prior = _prior_for_run(cfg, split, run.run_dir, run.info)
    train_set = make_dataset(cfg, split.train, prior=prior)
    val_set = make_dataset(cfg, split.val, prior=prior) if split.val else None
    if len(train_set) == 0:
        raise ValueError(f"{cfg.data.root}: no training items for kind {cfg.kind!r} "
                         f"(field source {cfg.data.field_source!r})" if cfg.kind == "dvf" else
                         f"{cfg.data.root}: no CT volumes of phases {cfg.data.phases} for the training patients")
    run.start(cfg, split, f"{len(train_set)} train / {len(val_set) if val_set else 0} val items")
    return run.fit(AutoencoderTask(cfg, split, prior), train_set, val_set, cfg.train, cfg, init)
