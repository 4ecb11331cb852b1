"""What a model gives the training engine (:class:`Task`): its network, the loss of a batch, what to log and store.

:class:`respmotion.training.engine.Trainer` runs any :class:`Task`; the autoencoders
(:mod:`respmotion.training.autoencoder_task`) and the diffusion model (:mod:`respmotion.diffusion.task`) are
tasks.  A task sees the model as the engine runs it, possibly wrapped in DDP: :func:`unwrap` gives the module
itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset


class Task:
    """What a model must provide to the engine.  Subclass and override.

    ``loss`` receives the model as the engine runs it (possibly wrapped in DDP) and must call
    ``model(...)`` (its ``forward``) exactly once, so DDP synchronises gradients; it returns a
    dict with a scalar ``"loss"`` (the mean over the batch's items, so that DDP's gradient mean
    equals one process's) plus any scalars to log.
    """

    name: str = "task"

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def model_config(self) -> dict[str, Any]:
        """Plain dict that rebuilds the architecture (stored as ``model_config``)."""
        return {}

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def val_metrics(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
        """Scalars of one validation batch beside the loss (model in eval mode, no gradients); the engine
        averages them over the batches and logs them to TensorBoard under ``val/``."""
        return {}

    def images(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``name -> (C, H, W)`` tensors in ``[0, 1]`` for TensorBoard (model in eval mode)."""
        return {}

    def extra(self, model: nn.Module) -> dict[str, Any]:
        """Task data stored in every checkpoint under ``extra`` (plain containers/tensors)."""
        return {}

    def on_train_end(self, model: nn.Module, train_set: Dataset, device: torch.device) -> None:
        """Hook run once on rank 0 after the last step (e.g. to estimate a latent scale)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself: ``model`` unwrapped from ``DistributedDataParallel`` (``model`` when it is not wrapped)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
