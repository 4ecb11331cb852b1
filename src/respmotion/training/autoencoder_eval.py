"""Reconstruction metrics of a trained autoencoder on a patient split (the test split by default).

Image autoencoder (physical units, target clipped to the model's HU window, which is all it can
represent): MAE in HU, PSNR (MONAI :class:`~monai.metrics.PSNRMetric`, peak = window width) and
3D SSIM (MONAI :class:`~monai.metrics.SSIMMetric`, data range = window width).
DVF autoencoder: per-voxel error vector length ``|u_pred - u_true|`` in mm, mean and 95th
percentile, also over the voxels that move more than 1 mm; as a yardstick, the same numbers for
predicting no motion (``u = 0``) and, for a model with a motion prior (it codes ``u - prior``),
for predicting the prior itself (``prior_error_*``).  Per-item values are averaged over items.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from ..config import from_dict, save_config
from ..io.atomic import write_json
from ..io.checkpoint import load_checkpoint, run_weights
from ..io.torchfile import load_state
from ..models.autoencoder import Autoencoder, AutoencoderNetConfig
from ..models.prior import MotionPrior, prior_from_record
from ..runtime import resolve_device
from .autoencoder import AutoencoderRunConfig, make_dataset
from .splits import Split


@dataclass
class AEEvalConfig:
    checkpoint: str = ""  # model.pt, a <step>.pt, or a run folder (its newest checkpoint)
    data_root: str = ""  # default: the training run's data.root
    split: str = "test"  # train | val | test (patients stored with the model)
    out: str = ""  # default: <run folder>/eval_<split>
    device: str = "auto"
    max_items: int = 0  # 0 = all


def _image_metrics(model: Autoencoder, x_hu: torch.Tensor) -> dict[str, float]:
    c = model.cfg
    lo, hi = c.hu_window
    target = torch.clamp(x_hu, lo, hi)
    pred = torch.clamp(model.denormalize(model(model.normalize(x_hu)).recon.float()), lo, hi)
    width = hi - lo
    win = min(7, *[n if n % 2 else n - 1 for n in x_hu.shape[2:]])
    return {
        "mae_hu": float((pred - target).abs().mean()),
        "psnr_db": float(PSNRMetric(max_val=width)(pred, target).mean()),
        "ssim": float(SSIMMetric(spatial_dims=3, data_range=width, win_size=win)(pred, target).mean()),
    }


def _dvf_metrics(model: Autoencoder, u_mm: torch.Tensor, prior_mm: torch.Tensor | None = None,
                 scale: float = 1.0) -> dict[str, float]:
    """``u_mm`` (1, 3, Z, Y, X) full field; with ``prior_mm`` the model codes ``(u - prior) / scale``
    (:meth:`respmotion.models.prior.MotionPrior.residual`) and the prior is added back, so errors are always of
    the full field."""
    base = torch.zeros_like(u_mm) if prior_mm is None else prior_mm
    pred = model.denormalize(model(model.normalize((u_mm - base) / scale)).recon.float()) * scale + base
    err = (pred - u_mm).norm(dim=1).flatten().cpu().numpy()
    mag = u_mm.norm(dim=1).flatten().cpu().numpy()
    moving = mag > 1.0
    out = {
        "error_mean_mm": float(err.mean()),
        "error_p95_mm": float(np.percentile(err, 95)),
        "no_motion_error_mean_mm": float(mag.mean()),
        "no_motion_error_p95_mm": float(np.percentile(mag, 95)),
    }
    if prior_mm is not None:
        res = (u_mm - prior_mm).norm(dim=1).flatten().cpu().numpy()
        out["prior_error_mean_mm"] = float(res.mean())
        out["prior_error_p95_mm"] = float(np.percentile(res, 95))
    if moving.any():
        out["moving_error_mean_mm"] = float(err[moving].mean())
        out["moving_error_p95_mm"] = float(np.percentile(err[moving], 95))
    return out


@torch.no_grad()
def evaluate_model(model: Autoencoder, dataset, device: torch.device, max_items: int = 0,
                   prior: MotionPrior | None = None) -> dict[str, Any]:
    """Metrics of ``model`` over ``dataset`` items (see module docstring).

    ``prior``: the DVF model's motion prior (it codes residuals); ``dataset`` must then give full
    fields (no prior of its own) and items with a ``field_id``.
    """
    if prior is not None and getattr(dataset, "prior", None) is not None:
        raise ValueError("pass a dataset of full fields: the prior is added by evaluate_model")
    model.eval().to(device)
    n = len(dataset) if not max_items else min(max_items, len(dataset))
    per_item = []
    for i in range(n):
        item = dataset[i]
        x = item["x"][None].to(device)
        if model.cfg.kind == "image":
            m = _image_metrics(model, x)
        else:
            fid = item["field_id"]
            base = None if prior is None else prior.stack(
                [fid], like=x, features=dataset.features(i) if prior.needs_features else None)
            m = _dvf_metrics(model, x, base, 1.0 if prior is None else prior.scales[fid])
        per_item.append({"key": item["key"], **m})
    keys = sorted({k for r in per_item for k in r if k != "key"})
    mean = {k: float(np.mean([r[k] for r in per_item if k in r])) for k in keys}
    return {"kind": model.cfg.kind, "items": n, "mean": mean, "per_item": per_item}


def evaluate_autoencoder(cfg: AEEvalConfig) -> tuple[dict[str, Any], Path]:
    """Evaluate a checkpoint on its stored patient split; writes ``metrics.json`` + ``config.yaml``."""
    if not cfg.checkpoint:
        raise ValueError("no checkpoint given (--checkpoint)")
    path = run_weights(cfg.checkpoint)
    ckpt = load_checkpoint(path)
    if "model_config" not in ckpt or not str(ckpt.get("task", "")).startswith("autoencoder"):
        raise ValueError(f"{path}: not an autoencoder checkpoint (task {ckpt.get('task')!r})")
    run_cfg = from_dict(AutoencoderRunConfig, ckpt["config"], source=str(path))
    patients = list(Split.from_dict(ckpt["extra"].get("split", {})).get(cfg.split))
    if not patients:
        raise ValueError(f"{path}: the stored {cfg.split} split has no patients")
    root = cfg.data_root or run_cfg.data.root
    dataset = make_dataset(run_cfg, patients, root)
    if len(dataset) == 0:
        raise ValueError(f"{root}: no items for the {cfg.split} patients {patients}")
    model = Autoencoder(AutoencoderNetConfig.from_dict(ckpt["model_config"]))
    load_state(model, ckpt["model"], path)  # weights that do not fit: one line naming the file
    device = resolve_device(cfg.device)
    prior = prior_from_record(ckpt["extra"].get("motion_prior"), path.parent)
    metrics = evaluate_model(model, dataset, device, cfg.max_items, prior)
    metrics.update(checkpoint=str(path), step=int(ckpt["step"]), split=cfg.split, patients=list(patients),
                   data_root=str(root))
    out = Path(cfg.out) if cfg.out else path.parent / f"eval_{cfg.split}"
    write_json(out / "metrics.json", metrics)
    save_config(cfg, out / "config.yaml")
    return metrics, out
