"""The research code's published models (``seed:DIR``) as a synthesis motion model, in mm.

``respmotion synthesize CT --model seed:DIR`` runs the three networks of
:mod:`respmotion.models.seed` on a CT and returns our pull fields ``(3, z, y, x)`` in mm of every
phase relative to 00 %.  What the research code does, and what we do with it:

* **Input.**  HU clipped to [-1024, 3071] and mapped linearly to [-1, 1], then resampled to the
  model grid (default 50x256x256; trilinear, ``align_corners=False``: the field of view, voxel
  edges, is kept, as :meth:`Geometry.resized`) - the research order, clip first.
* **Model.**  Phase index ``p`` is the transition p -> p+1 (0 -> 10 % ... 80 -> 90 %), conditioned
  on the image latent of the phase it starts from.  The UNet predicts epsilon of the 9 DVF latent
  channels (the 3 image channels ride along unchanged) at diffusion time ``t / T``, ``t`` in
  ``1..T``; T = 1000 linear betas ``linspace(1e-4, 0.02, T + 1)[:T]``.
* **Output.**  ``dvf_decoder(x0) / dvf_scale_factor`` is an airlab displacement ``d`` of shape
  ``(3, Z, Y, X)``, channels ``(x, y, z)`` (airlab's ``compute_grid`` order), in normalised grid
  units: output voxel ``i`` samples the moving image at ``grid_sample`` coordinate
  ``g_i + d(i)`` with ``g_i = -1 + 2 i / (n - 1)`` (airlab's identity grid) and PyTorch's default
  ``align_corners=False`` (how both airlab's registration loss and the research ``warp_image``
  call ``grid_sample``).  So the pulled position along an axis of ``n`` voxels is
  ``p = ((g_i + d + 1) n - 1) / 2`` and our pull field is ``u = (p - i) * spacing`` mm.  A zero
  airlab field is *not* the identity here (a magnification by n / (n - 1), +-0.5 voxel at the
  edges): the registrations the model learned from were made in that convention, so it is kept.
  Registration of phase p (moving) to p+1 (fixed): the field is our "step" field of phase p.
* **Cycle.**  The research ``dvf_movie.py`` sums the sampled steps; here they are composed,
  ``u_{p+1} = compose(u_p, step_p)`` (:func:`respmotion.core.warp.compose`), and the next
  condition is the 00 % model-grid image warped by ``u_{p+1}``.  The model has no 90 -> 00 %
  transition: the cycle is closed by definition, phase 00 being the input CT itself (``u_00 = 0``),
  so the implied 90 -> 00 step is the inverse of ``u_90``; it is not sampled, and its size is the
  ``dvf_90`` statistics of the summary.
* **Sampling.**  One initial noise per cycle, shared by the nine transitions (our coherence
  design, :mod:`respmotion.diffusion.sampling`).  Samplers are :mod:`respmotion.diffusion.schedulers`'s:
  ``ddim`` with ``delta_t`` (research default 5 -> 200 steps, timesteps T, T - 5, ..., 5 as in the
  research loop), ``dpmpp2m`` (fast), ``ddpm``.  Research bugs fixed: its DDIM reads alpha-bar of
  the *next* timestep one index late (``ps_alpha[t_next]`` for ``ps_alpha[t_next - 1]``); its DDPM
  draws noise for 11 channels (``[:, 1:]``) where 9 DVF channels are updated (so it fails) and
  uses variance beta_t; our DDPM uses the posterior variance.

Usage::

    motion = load_seed_motion("weights/", sampler="dpmpp2m", steps=20)
    cycles = motion.generate(ct, samples=1, seed=0)   # [{0: u_00, 10: u_10, ..., 90: u_90}]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core import warp as W
from ..core.geometry import normalized_to_index
from ..core.types import DisplacementField, Volume
from ..diffusion.config import SamplerConfig, ScheduleConfig, choose_sampler
from ..diffusion.schedulers import NoiseSchedule, make_sampler, run_sampler
from ..io.layout import PHASES
from ..models.seed import SeedModels, load_seed_checkpoints

#: the HU window the research checkpoints were trained with (not respmotion's data.intensity.HU_WINDOW)
RESEARCH_HU_WINDOW = (-1024.0, 3071.0)
DEFAULT_SAMPLER = SamplerConfig(name="ddim", delta_t=5)  # the research default: 200 DDIM steps


def normalize_hu(hu: np.ndarray) -> np.ndarray:
    """HU -> [-1, 1] through the research window [-1024, 3071] (clipped)."""
    lo, hi = RESEARCH_HU_WINDOW
    return (2.0 * (np.clip(hu.astype(np.float32), lo, hi) - lo) / (hi - lo) - 1.0).astype(np.float32)


def model_input(ct: Volume, shape: tuple[int, int, int]) -> torch.Tensor:
    """The research network input ``(1, 1, *shape)``: normalised, then trilinear to ``shape``
    (``align_corners=False``, no anti-aliasing, as the research preprocessing)."""
    x = torch.from_numpy(normalize_hu(ct.array))[None, None]
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)


def airlab_to_pull_mm(d: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    """Airlab displacement ``(B, 3, Z, Y, X)`` (channels x, y, z; normalised units) -> our pull
    field ``(B, 3, Z, Y, X)`` (components z, y, x) in mm on a grid of ``spacing`` (sz, sy, sx) mm.

    Per axis of ``n`` voxels: ``u = (((g_i + d + 1) n - 1) / 2 - i) * spacing`` with
    ``g_i = linspace(-1, 1, n)[i]`` (module doc: ``grid_sample`` with ``align_corners=False``).
    """
    vox = []
    for axis in range(3):  # z, y, x
        n = d.shape[2 + axis]
        view = [1, 1, 1, 1]
        view[1 + axis] = n
        idx = torch.arange(n, dtype=torch.float64, device=d.device)
        grid = torch.linspace(-1.0, 1.0, n, dtype=torch.float64, device=d.device)
        pulled = normalized_to_index(grid.reshape(view) + d[:, 2 - axis].double(), n, align_corners=False)
        vox.append(pulled - idx.reshape(view))
    return W.voxels_to_mm(torch.stack(vox, dim=1), spacing).to(d.dtype)


def seed_schedule(models: SeedModels) -> NoiseSchedule:
    """The research forward process as our :class:`NoiseSchedule` (epsilon prediction).

    Its linear betas are ``linspace(b0, b1, T + 1)[:T]`` (b0 = 1e-4, b1 = 0.02 at T = 1000, both
    scaled by 1000 / T), i.e. MONAI's ``linspace(b0, b0 + (b1 - b0) (T - 1) / T, T)``.  Its cosine
    schedule (clamped at 0.999, no lower clip) differs from MONAI's and is refused.
    """
    args = models.unet_args
    if args.noise_schedule != "linear":
        raise ValueError(f"seed UNet noise_schedule {args.noise_schedule!r}: only the research 'linear' schedule "
                         f"(the published model's) is supported")
    if "T" not in models.unet_train_args:
        raise ValueError("seed ldm/args.json: train_args lacks 'T' (number of diffusion timesteps)")
    T = int(models.unet_train_args["T"])
    b0, b1 = 1e-4 * 1000 / T, 0.02 * 1000 / T
    return NoiseSchedule(ScheduleConfig(num_train_timesteps=T, schedule="linear_beta", beta_start=b0,
                                        beta_end=b0 + (b1 - b0) * (T - 1) / T, prediction_type="epsilon"))


class SeedMotion:
    """A :class:`~respmotion.synthesis.pipeline.MotionModel` running the research networks.

    ``generate(ct, samples, seed)`` -> per sample ``{0: 0, 10: u_10, ..., 90: u_90}``, pull fields
    in mm on ``ct.geometry.resized(self.shape)`` (the model grid over the CT's field of view).
    Takes the native CT: the research preprocessing (HU window, trilinear resampling without
    anti-aliasing, :func:`model_input`) is applied here, as the networks were trained on it.
    """

    resamples_input = True

    def __init__(self, models: SeedModels, sampler: SamplerConfig = DEFAULT_SAMPLER, device: str = "cpu",
                 shape: tuple[int, int, int] = (50, 256, 256)):
        self.models = models.to(device)
        self.device = device
        self.shape = tuple(shape)
        self.schedule = seed_schedule(models)
        self.sampler = make_sampler(self.schedule, sampler)
        self.provenance = {
            "kind": "seed", **models.provenance, "sampler": sampler.name, "steps": self.sampler.num_steps,
            "delta_t": sampler.delta_t if sampler.name == "ddim" and not sampler.steps else None, "eta": sampler.eta,
            "prediction": "epsilon", "T": self.schedule.T, "model_shape": list(self.shape),
            "cycle": "steps p->p+1 (p = 0..8) sampled autoregressively and composed; 90->00 % not sampled: "
                     "phase 00 is the input (u_00 = 0), the implied closing step is the inverse of u_90",
        }

    def describe(self) -> dict:
        """What summary.json records about the motion: checkpoints (sha256), sampler, schedule, cycle."""
        return dict(self.provenance)

    @torch.no_grad()
    def transition(self, image: torch.Tensor, phase: int, x_T: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One sampled step ``p -> p + 1`` (``phase`` = p, 0..8) for normalised model-grid images
        ``(S, 1, *shape)`` of phase p, from initial noise ``x_T`` ``(S, 9, *latent)`` (``gen`` draws
        the stochastic samplers' noise).  Returns the airlab displacement ``(S, 3, *shape)``
        (channels x, y, z; normalised units: :func:`airlab_to_pull_mm` converts)."""
        m = self.models
        z_img = m.image_encoder(image)
        labels = torch.full((image.shape[0],), phase, dtype=torch.long, device=image.device)
        T = self.schedule.T

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return m.unet(torch.cat((z_img, x), dim=1), (t.float() + 1.0) / T, labels)

        def noise_fn() -> torch.Tensor:
            return torch.randn(x_T.shape, generator=gen, device=x_T.device, dtype=x_T.dtype)

        x0 = run_sampler(self.sampler, model_fn, x_T, noise_fn)
        return m.dvf_decoder(x0) / m.dvf_scale_factor

    @torch.no_grad()
    def generate(self, ct: Volume, samples: int, seed: int) -> list[dict[int, DisplacementField]]:
        geo = ct.geometry.resized(self.shape)
        spacing = tuple(float(s) for s in geo.spacing)
        img0 = model_input(ct, self.shape).to(self.device).expand(samples, -1, -1, -1, -1)
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        latent = self.models.image_encoder(img0[:1]).shape[2:]
        x_T = torch.randn((samples, self.models.unet_args.out_channels, *latent), generator=gen, device=self.device)
        u = torch.zeros((samples, 3, *self.shape), device=self.device)
        fields = [u]
        current = img0
        for p in range(len(PHASES) - 1):
            step = airlab_to_pull_mm(self.transition(current, p, x_T, gen), spacing)
            u = W.compose(u, step, spacing)
            fields.append(u)
            current = W.warp(img0, u, spacing)
        return [{k: DisplacementField(fields[i][s].cpu().numpy(), geo, {"sample": s, "phase": k, "model": "seed"})
                 for i, k in enumerate(PHASES)} for s in range(samples)]


def load_seed_motion(root: str | Path, device: str = "cpu", sampler: str | None = None, steps: int | None = None,
                     delta_t: int | None = None) -> SeedMotion:
    """``seed:DIR`` motion model.  Default: the research DDIM (delta_t 5 = 200 steps); ``sampler``,
    ``steps`` and ``delta_t`` choose another as for our bundles
    (:func:`respmotion.diffusion.config.choose_sampler`: dpm 20 steps, ddpm all T; one-line
    ``ValueError`` for an impossible combination)."""
    models = load_seed_checkpoints(root, device=device)
    T = seed_schedule(models).T
    cfg = choose_sampler(DEFAULT_SAMPLER, T, sampler, steps, delta_t)
    return SeedMotion(models, cfg, device, shape=model_shape(models))


def model_shape(models: SeedModels) -> tuple[int, int, int]:
    """Image grid of the models: the UNet's latent size times the image encoder's reductions
    (x2 in-plane per level, x2 in Z per level without ``keep_z``); 50x256x256 when published."""
    a = models.image_args
    w = models.unet_args.image_width * 2 ** len(a.channel_multipliers)
    z = models.unet_args.image_depth * 2 ** sum(not k for k in a.keep_z)
    return (z, w, w)
