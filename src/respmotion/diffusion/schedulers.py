"""Noise schedule (forward process) and samplers (reverse process) on latents.

The betas come from MONAI's named schedules (:class:`~monai.networks.schedulers.DDPMScheduler`'s public
``betas``).  The tables derived from them, the DDPM posterior and the reverse *steps* are written here,
for four reasons found reading MONAI 1.6.1:

* MONAI's ``DDIMScheduler.step`` takes the previous timestep as ``t - T // n`` while its
  ``set_timesteps`` spaces timesteps by ``round(linspace(T - 1, 0, n))``; for n = 200 (the
  research default) the two disagree by one step at many steps, which is the same
  "alpha-bar one step off" bug SPEC §8 records for the research code.  Here the previous
  timestep is always the next entry of the schedule.
* MONAI draws step noise inside ``step`` with the batch shape, so it cannot share one noise draw
  across the phases of a cycle; here the caller supplies the noise (see ``noise_fn``).
* MONAI clips the predicted x0 to [-1, 1] by default, wrong for unit-variance latents.
* MONAI builds its tables in float32; the cumulative product then loses ~4 significant digits
  of ``1 - alpha-bar`` near t = 0 (the DDPM posterior mean was off by ~3e-4 at t = 1).  We
  build alphas and alpha-bar in float64 from MONAI's betas.
* MONAI's posterior mean and variance are private methods reading its own (float32) tables, so
  :meth:`NoiseSchedule.posterior` writes the closed form (Ho et al. 2020, eqs. 6-7) on ours.

Timesteps are "trailing": ``t_i = round(T - i * T / n) - 1``, i = 0..n-1 (999, 994, ..., 4 for
n = 200), and the last step lands on alpha-bar = 1 (clean).  All samplers share one loop,
:func:`run_sampler`.  Shapes: any ``(B, ...)``; timesteps are int64 ``(B,)`` for the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from monai.networks.schedulers import DDPMScheduler

from .config import PREDICTION_TYPES, SamplerConfig, ScheduleConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t (B,)) -> model output
NoiseFn = Callable[[], torch.Tensor]  # -> a standard normal tensor shaped like x_t


class NoiseSchedule:
    """Forward process ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`` from MONAI's tables.

    ``prediction_type`` is ``epsilon`` (the model predicts eps), ``v_prediction``
    (``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0``) or ``sample`` (x0 itself).
    """

    def __init__(self, cfg: ScheduleConfig):
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {cfg.prediction_type!r}")
        kwargs = {} if cfg.schedule == "cosine" else {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}
        self.cfg = cfg
        monai = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps,
            schedule=cfg.schedule,
            clip_sample=False,
            prediction_type=cfg.prediction_type,
            **kwargs,
        )
        self.T = int(cfg.num_train_timesteps)
        self.betas = monai.betas.double()  # (T,) float64
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def alpha_bar(self, t: int) -> float:
        """alpha-bar at integer timestep ``t``; ``t < 0`` means clean (1.0)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def posterior(self, t: int) -> tuple[float, float, float]:
        """DDPM posterior ``q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, var)`` at integer timestep ``t`` (Ho et al.
        2020, eqs. 6-7, on the float64 tables): returns ``(c0, ct, var)``; at ``t = 0`` the variance is 0."""
        ab, abp, beta = self.alpha_bar(t), self.alpha_bar(t - 1), float(self.betas[t])
        c0 = math.sqrt(abp) * beta / (1.0 - ab)
        ct = math.sqrt(float(self.alphas[t])) * (1.0 - abp) / (1.0 - ab)
        return c0, ct, (1.0 - abp) / (1.0 - ab) * beta

    def _coef(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(ab_t), sqrt(1 - ab_t) computed in float64, shaped to broadcast over ``like``."""
        ab = self.alphas_cumprod[t.cpu().long()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        cast = lambda v: v.to(like.device, like.dtype).reshape(shape)  # noqa: E731
        return cast(ab.sqrt()), cast((1.0 - ab).sqrt())

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` for timesteps ``t`` ``(B,)`` (or ``(1,)``, broadcast).  MONAI's ``add_noise`` is
        not used: it recasts the scheduler's tables to the sample dtype in place."""
        a, s = self._coef(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output (eps, v = sqrt(ab) eps - sqrt(1 - ab) x0, or x0)."""
        if self.cfg.prediction_type == "epsilon":
            return noise
        if self.cfg.prediction_type == "sample":
            return x0
        a, s = self._coef(t, x0)
        return a * noise - s * x0

    def split(self, model_out: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output at timestep ``t`` -> (predicted x0, predicted eps)."""
        ab = self.alpha_bar(t)
        a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
        if self.cfg.prediction_type == "epsilon":
            eps = model_out
            x0 = (x_t - s * eps) / a
        elif self.cfg.prediction_type == "sample":
            x0 = model_out
            eps = (x_t - a * x0) / s
        else:
            x0 = a * x_t - s * model_out
            eps = a * model_out + s * x_t
        return x0, eps


def trailing_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` timesteps from T - 1 down, evenly spaced, the last one ``T / steps - 1``."""
    if not 1 <= steps <= T:
        raise ValueError(f"number of sampling steps must be in 1..{T}, got {steps}")
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


@dataclass
class Sampler:
    """A reverse process over ``timesteps`` (descending; the step after the last lands on x0)."""

    schedule: NoiseSchedule
    timesteps: list[int]

    name = "base"

    def prev(self, i: int) -> int:
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def reset(self) -> None:
        """Clear multistep state before a new trajectory."""

    def step(self, i: int, model_out: torch.Tensor, x: torch.Tensor, noise_fn: NoiseFn) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


class DDPMSampler(Sampler):
    """Ancestral DDPM: the posterior mean q(x_{t-1} | x_t, x0) plus its (fixed-small) variance."""

    name = "ddpm"

    def step(self, i: int, model_out: torch.Tensor, x: torch.Tensor, noise_fn: NoiseFn) -> torch.Tensor:
        t = self.timesteps[i]
        if self.prev(i) != t - 1:
            raise ValueError("DDPM sampling needs consecutive timesteps (use all T steps)")
        x0, _ = self.schedule.split(model_out, x, t)
        c0, ct, var = self.schedule.posterior(t)
        mean = c0 * x0 + ct * x
        if t == 0:
            return mean
        return mean + math.sqrt(var) * noise_fn()


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12): ``x_prev = sqrt(ab') x0 + sqrt(1 - ab' - s^2) eps + s z``,
    ``s = eta * sqrt((1 - ab') / (1 - ab) * (1 - ab / ab'))``; eta = 0 is deterministic."""

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, timesteps: list[int], eta: float = 0.0):
        super().__init__(schedule, timesteps)
        self.eta = float(eta)

    def step(self, i: int, model_out: torch.Tensor, x: torch.Tensor, noise_fn: NoiseFn) -> torch.Tensor:
        t, tp = self.timesteps[i], self.prev(i)
        ab, abp = self.schedule.alpha_bar(t), self.schedule.alpha_bar(tp)
        x0, eps = self.schedule.split(model_out, x, t)
        sigma = self.eta * math.sqrt((1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp)) if self.eta > 0 else 0.0
        out = math.sqrt(abp) * x0 + math.sqrt(max(1.0 - abp - sigma**2, 0.0)) * eps
        if sigma > 0:
            out = out + sigma * noise_fn()
        return out


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022), data-prediction multistep solver of the probability-flow
    ODE; first order on the first step and on the last (which lands on alpha-bar = 1)."""

    name = "dpmpp2m"

    def __init__(self, schedule: NoiseSchedule, timesteps: list[int]):
        super().__init__(schedule, timesteps)
        self._prev_x0: torch.Tensor | None = None
        self._prev_lambda = 0.0

    def reset(self) -> None:
        self._prev_x0 = None

    @staticmethod
    def _lam(ab: float) -> float:
        return 0.5 * math.log(ab / (1.0 - ab))

    def step(self, i: int, model_out: torch.Tensor, x: torch.Tensor, noise_fn: NoiseFn) -> torch.Tensor:
        t, tp = self.timesteps[i], self.prev(i)
        ab, abp = self.schedule.alpha_bar(t), self.schedule.alpha_bar(tp)
        x0, _ = self.schedule.split(model_out, x, t)
        lam_s = self._lam(ab)
        if tp < 0:  # sigma' = 0: the ODE solution is the (corrected) data prediction
            self._prev_x0 = None
            return x0
        lam_t = self._lam(abp)
        h = lam_t - lam_s
        d = x0
        if self._prev_x0 is not None:
            r = (lam_s - self._prev_lambda) / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * self._prev_x0
        sig_ratio = math.sqrt((1.0 - abp) / (1.0 - ab))
        out = sig_ratio * x + math.sqrt(abp) * (1.0 - math.exp(-h)) * d
        self._prev_x0, self._prev_lambda = x0, lam_s
        return out


def make_sampler(schedule: NoiseSchedule, cfg: SamplerConfig) -> Sampler:
    """Build the sampler named in ``cfg`` (see :class:`~respmotion.diffusion.config.SamplerConfig`)."""
    T = schedule.T
    steps = cfg.num_steps(T)  # validates name and steps/delta_t (one-line ValueError)
    if cfg.name == "ddpm":
        return DDPMSampler(schedule, list(range(T - 1, -1, -1)))
    ts = trailing_timesteps(T, steps)
    if cfg.name == "ddim":
        return DDIMSampler(schedule, ts, cfg.eta)
    return DPMSolverPP2M(schedule, ts)


@torch.no_grad()
def run_sampler(sampler: Sampler, model_fn: ModelFn, x_T: torch.Tensor, noise_fn: NoiseFn) -> torch.Tensor:
    """Integrate the reverse process from ``x_T`` (pure noise) to x0 (same shape)."""
    sampler.reset()
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = sampler.step(i, model_fn(x, tt), x, noise_fn)
    sampler.reset()
    return x
