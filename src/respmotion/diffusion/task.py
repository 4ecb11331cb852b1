"""The diffusion model as a task of the shared training engine (:mod:`respmotion.training.engine`).

Loss (per batch of latent items, see :class:`~respmotion.diffusion.latents.LatentDataset`):
normalise the DVF and image latents with the per-channel statistics of the training set, draw
``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``, noise ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``, and
regress the network output on ``eps`` (or ``v``) with MSE.

``t`` and ``eps`` come from a generator seeded by (optimizer step, the items' keys), not from the
global RNG: a resumed run then draws exactly what the uninterrupted run drew (the global stream
is shifted by one draw when a resumed run creates its DataLoader iterator), DDP ranks draw
independently (different items), and validation (seeded by the keys only) gives losses that are
comparable across steps.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import to_dict
from ..training.task import Task, unwrap
from .config import DiffusionModelConfig, SamplerConfig
from .model import LatentDiffusion
from .sampling import LatentNorm
from .schedulers import NoiseSchedule, make_sampler, run_sampler


class DiffusionTask(Task):
    """Engine task: builds :class:`LatentDiffusion`, computes the denoising loss, updates the EMA."""

    name = "diffusion"

    def __init__(self, model_cfg: DiffusionModelConfig, image_norm: LatentNorm, dvf_norm: LatentNorm,
                 ema_decay: float, total_steps: int, extra: dict[str, Any] | None = None,
                 sampler: SamplerConfig | None = None,
                 image_dev: tuple[torch.Tensor, torch.Tensor] | None = None,
                 anatomy_stats: tuple[torch.Tensor, torch.Tensor] | None = None, val_samples: int = 4) -> None:
        """``image_dev``: voxel-wise mean ``(Ci, Z, Y, X)`` and across-patient std ``(Ci,)`` of the
        training image latents (for ``model_cfg.image_condition`` deviation/both); ``anatomy_stats``:
        mean and std ``(F,)`` of the training patients' lung features (for ``model_cfg.anatomy_condition``);
        ``val_samples``: latents sampled per validation item for :meth:`val_metrics` (< 2: none)."""
        self.model_cfg = model_cfg
        self.image_norm, self.dvf_norm = image_norm, dvf_norm
        self.image_dev = image_dev
        self.anatomy_stats = anatomy_stats
        self.val_samples = int(val_samples)
        self.ema_decay = float(ema_decay)
        self.total_steps = int(total_steps)
        self.schedule = NoiseSchedule(model_cfg.schedule)
        self._extra = dict(extra or {})
        self.sampler = sampler or SamplerConfig()

    def build_model(self) -> nn.Module:
        mean, std = self.image_dev if self.image_dev is not None else (None, None)
        return LatentDiffusion(self.model_cfg, LatentNorm(self.image_norm.mean, self.image_norm.std),
                               LatentNorm(self.dvf_norm.mean, self.dvf_norm.std), self.ema_decay, mean, std,
                               self.anatomy_stats)

    def model_config(self) -> dict[str, Any]:
        return {**to_dict(self.model_cfg), "ema_decay": self.ema_decay}

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        m: LatentDiffusion = unwrap(model)
        if model.training and step > 0:
            m.update_ema(step)  # weights after `step` optimizer steps, once per step
        x0 = m.dvf_norm.normalize(batch["x"].float(), batch["phase"])
        img = m.condition(batch["image"].float(), batch.get("features"))
        dev = x0.device
        keys = "|".join(batch.get("key", [])).encode()
        seed = zlib.crc32(keys) if not model.training else zlib.crc32(keys, step + 1) + 1_000_003 * step
        gen = torch.Generator(device=dev).manual_seed(seed)
        t = torch.randint(0, self.schedule.T, (x0.shape[0],), device=dev, generator=gen)
        noise = torch.randn(x0.shape, device=dev, generator=gen)
        x_t = self.schedule.add_noise(x0, noise, t)
        pred = model(x_t, img, t, batch["phase"])
        loss = F.mse_loss(pred.float(), self.schedule.target(x0, noise, t))
        return {"loss": loss}

    def val_metrics(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
        """The model as a generator on a validation batch, in normalised latent units: for each item
        :attr:`val_samples` latents are sampled (EMA weights, the run's sampler, noise seeded by the items'
        keys) and scored against the item's true latent ``y`` with the Euclidean norm over the latent divided by
        sqrt(its size) (an RMS per element): ``energy_score`` = ``E|X - y| - E|X - X'| / 2`` (proper; lower is
        better), ``mean_error`` = ``|mean X - y|``, ``spread`` = the samples' RMS standard deviation."""
        k = self.val_samples
        if k < 2:
            return {}
        m: LatentDiffusion = unwrap(model)
        y = m.dvf_norm.normalize(batch["x"].float(), batch["phase"])
        b, size = y.shape[0], y[0].numel()
        cond = m.condition(batch["image"].float(), batch.get("features")).repeat_interleave(k, 0)
        phase = batch["phase"].repeat_interleave(k, 0)
        gen = torch.Generator(device=y.device).manual_seed(zlib.crc32("|".join(batch.get("key", [])).encode()))
        draw = lambda: torch.randn((b * k, *y.shape[1:]), generator=gen, device=y.device)  # noqa: E731
        net = m.sampling_net(self.sampler.use_ema)
        x = run_sampler(make_sampler(self.schedule, self.sampler), lambda xt, t: net(xt, cond, t, phase), draw(), draw)
        x = x.float().reshape(b, k, size)
        yf = y.reshape(b, 1, size)
        scale = size ** 0.5
        skill = (x - yf).norm(dim=-1).mean(1)
        pair = torch.cdist(x, x).sum((1, 2)) / (k * (k - 1))
        mean = x.mean(1, keepdim=True)
        return {"energy_score": float((skill - 0.5 * pair).mean() / scale),
                "mean_error": float((mean - yf).norm(dim=-1).mean() / scale),
                "spread": float(((x - mean).pow(2).sum((1, 2)) / ((k - 1) * size)).sqrt().mean())}

    def extra(self, model: nn.Module) -> dict[str, Any]:
        return {**self._extra, **unwrap(model).describe(), "target": self.model_cfg.target,
                "sampler": to_dict(self.sampler)}

    @torch.no_grad()
    def on_train_end(self, model: nn.Module, train_set, device: torch.device) -> None:
        unwrap(model).update_ema(self.total_steps)
