"""Sampling breathing cycles of DVF latents: one cycle from one draw.

Coherence design (why a cycle's phases belong together).  The research code drew fresh noise
for every phase, so its "cycle" stitched together unrelated samples: each phase could pick a
different breathing amplitude or pattern.  Here every phase of one cycle starts from the **same
initial noise** x_T, and every later noise draw (DDPM, DDIM with eta > 0) is also shared across
the phases; with a deterministic sampler (DDIM eta = 0 or DPM-Solver++, the defaults) the
whole trajectory is then a fixed, smooth function of (x_T, image, phase).  The phase only enters
through its class embedding, so for one x_T the sample moves continuously with the phase: the
same draw picks the same "patient breathing" for all phases, and the amplitude rises from 0 %
to 50 % and falls back as the per-phase training targets do.  We chose this over joint
generation of all phases in one tensor because it keeps the research code's per-phase model
(one network, 12 -> 9 channels, any subset of phases, either target mode) and costs nothing at
training time; the coherence it gives is tested on the phantom (tests/test_diffusion.py: the
generated curve follows the true one and steps between phases stay within a stated factor of the
true steps), and ``shared_noise=False`` reproduces the research code's behaviour for comparison.

Shapes: image latent ``(Ci, Z, Y, X)``; result ``(P, Cd, Z, Y, X)`` for ``P`` phases, or
``(S, P, Cd, Z, Y, X)`` for ``S`` samples.  Latents here are *normalised* (see
:class:`LatentNorm`); decoding to millimetres is :meth:`respmotion.diffusion.pipeline`'s job.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .schedulers import Sampler, run_sampler
from .unet import phase_index


class LatentNorm(nn.Module):
    """Standardisation of latents ``(N, C, Z, Y, X)`` (any leading axes): ``z_n = (z - mean) / std``.

    Statistics ``(C,)`` (per channel) or ``(P, C)`` (per breathing phase index and channel: every phase's latents
    get unit scale, so the small residuals of the phases next to the reference weigh as much in the loss as the
    large ones at end-exhale).  With ``(P, C)`` statistics ``normalize``/``denormalize`` need ``phase``: the phase
    index (0..P-1) of every item, a long tensor of the latents' leading shape (e.g. ``(N,)``).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.ndim not in (1, 2) or mean.shape != std.shape:
            raise ValueError(f"latent mean/std must be (C,) or (P, C), got {tuple(mean.shape)}, {tuple(std.shape)}")
        if torch.any(std <= 0):
            raise ValueError("latent std must be positive")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @property
    def per_phase(self) -> bool:
        return self.mean.ndim == 2

    def _view(self, t: torch.Tensor, x: torch.Tensor, phase: torch.Tensor | None) -> torch.Tensor:
        t = t.to(x.device, x.dtype)
        if self.per_phase:
            if phase is None:
                raise ValueError("per-phase latent statistics need the phase index of every latent")
            idx = torch.as_tensor(phase, device=x.device).long()
            if tuple(idx.shape) != tuple(x.shape[:-4]):
                raise ValueError(f"phase indices {tuple(idx.shape)} do not match the latents' leading axes "
                                 f"{tuple(x.shape[:-4])}")
            return t[idx][..., None, None, None]  # (..., C, 1, 1, 1)
        shape = [1] * x.ndim
        shape[x.ndim - 4] = -1  # channel axis of (..., C, Z, Y, X)
        return t.view(shape)

    def normalize(self, z: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        return (z - self._view(self.mean, z, phase)) / self._view(self.std, z, phase)

    def denormalize(self, z: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        return z * self._view(self.std, z, phase) + self._view(self.mean, z, phase)

    def to_dict(self) -> dict[str, list]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def identity(cls, channels: int, phases: int = 0) -> "LatentNorm":
        """Zero mean, unit std: ``(channels,)``, or ``(phases, channels)`` when ``phases`` > 0."""
        shape = (phases, channels) if phases > 0 else (channels,)
        return cls(torch.zeros(shape), torch.ones(shape))


@torch.no_grad()
def sample_cycles(
    model: nn.Module,
    image_latent: torch.Tensor,
    phases: Sequence[int],
    sampler: Sampler,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
    shared_noise: bool = True,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Sample ``num_samples`` cycles of normalised DVF latents for one image latent.

    Args:
        model: a :class:`~respmotion.diffusion.unet.PhaseConditionedUNet` (use the EMA weights).
        image_latent: normalised image latent ``(Ci, Z, Y, X)``.
        phases: phases in percent (0, 10, ..., 90) to generate, in output order.
        sampler: from :func:`~respmotion.diffusion.schedulers.make_sampler`.
        generator: torch generator on the model's device (same seed -> same cycles).
        shared_noise: one noise draw per cycle for all phases (coherent); False draws per phase.
        max_batch: split the ``num_samples * P`` network batch into chunks of at most this size.

    Returns:
        ``(num_samples, P, Cd, Z, Y, X)`` normalised DVF latents.
    """
    if image_latent.ndim != 4:
        raise ValueError(f"image latent must be (C, Z, Y, X), got {tuple(image_latent.shape)}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    cd = model.cfg.dvf_channels
    S, P = int(num_samples), len(phases)
    spatial = tuple(image_latent.shape[1:])
    labels = torch.tensor([phase_index(int(p)) for p in phases], dtype=torch.long, device=device)
    labels = labels.repeat(S)  # (S*P,), sample-major
    img = image_latent.to(device, dtype)[None]

    def draw() -> torch.Tensor:
        per = 1 if shared_noise else P
        n = torch.randn((S, per, cd) + spatial, generator=generator, device=device, dtype=dtype)
        return n.expand(S, P, cd, *spatial).reshape(S * P, cd, *spatial)

    chunk = max_batch or S * P

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        outs = [model(x[i : i + chunk], img, t[i : i + chunk], labels[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
        return torch.cat(outs, 0)

    was_training = model.training
    model.eval()
    try:
        x = run_sampler(sampler, model_fn, draw(), draw)
    finally:
        model.train(was_training)
    return x.reshape(S, P, cd, *spatial)


def sample_cycle(
    model: nn.Module,
    image_latent: torch.Tensor,
    phases: Sequence[int],
    sampler: Sampler,
    generator: torch.Generator | None = None,
    shared_noise: bool = True,
) -> torch.Tensor:
    """One coherent cycle: normalised DVF latents ``(P, Cd, Z, Y, X)`` (see :func:`sample_cycles`)."""
    return sample_cycles(model, image_latent, phases, sampler, generator, 1, shared_noise)[0]
