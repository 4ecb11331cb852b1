"""Typed configuration of the latent diffusion stage (loaded through :mod:`respmotion.config`).

Sections: ``unet`` (the network), ``schedule`` (forward process), ``sampler`` (reverse process),
plus the target mode.  Defaults are the research code's (SPEC §3): 12 -> 9 channels, 3 levels,
T = 1000 linear betas, DDIM with stride ``delta_t`` = 5; except the prediction target, x0 instead
of epsilon (see :class:`ScheduleConfig`), the image condition (:class:`DiffusionModelConfig`), the
UNet's width (:class:`UNetConfig`) and the sampler a newly trained bundle records
(:data:`DEFAULT_SAMPLER`), both sized for the synthesis budget (docs/synthesis.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

TARGET_MODES = ("ref", "step")
#: the one sampler registry: canonical names (diffusion.schedulers builds them), the aliases the
#: commands also accept, and what each name means when it is chosen without --steps / --delta-t.
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
SAMPLER_ALIASES = {"dpm": "dpmpp2m"}
SAMPLER_CHOICES = SAMPLERS + tuple(SAMPLER_ALIASES)
SAMPLER_DEFAULTS = {  # (steps, delta_t): ddpm all T steps; ddim the research stride 5 (T / 5 steps); dpmpp2m 20
    "ddpm": (0, 1), "ddim": (0, 5), "dpmpp2m": (20, 5)}
IMAGE_CONDITIONS = ("plain", "deviation", "both")
DVF_NORMS = ("channel", "phase")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # sample = x0


@dataclass
class UNetConfig:
    """Phase-conditioned 3D diffusion UNet on latents (MONAI ``DiffusionModelUNet``).

    ``channels`` has one entry per level; every level but the last halves Z, Y and X, so the
    latent is padded to a multiple of ``2 ** (len(channels) - 1)`` and cropped back (see
    :mod:`respmotion.diffusion.unet`).
    """

    image_channels: int = 3
    dvf_channels: int = 9
    # (32, 64, 128) with one residual block per level (7.2 M parameters, the size of the research code's
    # 11.8 M UNet) instead of (64, 128, 256) with two (41.3 M): 1/5 of the time per network evaluation,
    # chosen for the synthesis budget (docs/synthesis.md); bundles store their own sizes
    channels: tuple[int, ...] = (32, 64, 128)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 32
    num_phases: int = 10  # class embeddings: phase index 0..9 (00 %..90 %)
    pad_mode: str = "replicate"  # how Z/Y/X are padded up to the multiple the UNet needs


@dataclass
class ScheduleConfig:
    """Forward (noising) process; tables come from MONAI's schedulers."""

    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"  # any MONAI NoiseSchedules name: linear_beta, scaled_linear_beta, cosine
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    # v_prediction (beyond the research code's epsilon): on the tiny phantom chain (300 CPU steps) the
    # epsilon model's x0 error at t >= 700 was 15-900 (normalised units) and every phase sampled to the
    # same mean field (6.3 mm lung error, zero field 6.6); with v the same run gave 1.46 mm and a
    # breathing curve.  sample (x0) prediction, with the motion prior and the deviation image condition
    # (12-patient chain, 250 steps, dpmpp2m-20): lung error 0.42 / 0.66 mm (train / held-out) vs
    # 0.54 / 0.77 mm with v and 0.95 / 1.36 mm for the population mean; x0 reached the DVF VAE's own
    # reconstruction error (0.40 / 0.54 mm).  epsilon and v stay selectable.
    prediction_type: str = "sample"  # epsilon | v_prediction | sample (x0)


@dataclass
class SamplerConfig:
    """Reverse process.

    * ``ddpm``: ancestral sampling over all T steps (stochastic; noise shared across the phases).
    * ``ddim``: DDIM with ``eta`` (0 = deterministic), timesteps every ``delta_t`` (research
      default 5 -> 200 steps) unless ``steps`` > 0 sets the count directly.
    * ``dpmpp2m``: DPM-Solver++(2M), deterministic multistep, good at 10-25 steps (the fast one).
    """

    name: str = "ddim"
    delta_t: int = 5
    steps: int = 0  # > 0 overrides delta_t (num_train_timesteps // delta_t)
    eta: float = 0.0
    use_ema: bool = True
    shared_noise: bool = True  # one draw per cycle: the same noise for every phase (coherent cycles)

    def __post_init__(self) -> None:
        self.name = SAMPLER_ALIASES.get(self.name, self.name)
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLER_CHOICES)}, got {self.name!r}")

    def num_steps(self, T: int) -> int:
        """Network evaluations of one trajectory for a schedule of ``T`` timesteps; raises a
        one-line ``ValueError`` for an impossible setting."""
        if self.name == "ddpm":
            if self.steps not in (0, T):
                raise ValueError(f"ddpm samples over all {T} timesteps; got steps={self.steps} (use ddim or dpm)")
            return T
        if self.steps > 0:
            if self.steps > T:
                raise ValueError(f"steps must be in 1..{T} (the schedule's timesteps), got {self.steps}")
            return self.steps
        if self.delta_t < 1 or T % self.delta_t:
            raise ValueError(f"delta_t must divide num_train_timesteps={T}, got {self.delta_t}")
        return T // self.delta_t


def choose_sampler(base: SamplerConfig, T: int, name: str | None = None, steps: int | None = None,
                   delta_t: int | None = None) -> SamplerConfig:
    """The sampler a user asked for on top of a bundle's default ``base`` (schedule of ``T`` timesteps);
    ``None``: not given (the one check of ``--sampler`` / ``--steps`` / ``--delta-t``).

    ``name`` (a :data:`SAMPLER_CHOICES` entry; None keeps ``base``'s): another sampler than the
    bundle's starts from that sampler's own defaults (:data:`SAMPLER_DEFAULTS`: ddpm all T steps,
    ddim T / 5, dpm 20), never from the bundle's step count.  ``steps`` sets the number of
    steps, ``delta_t`` the research code's stride (T / delta_t steps), each >= 1; both given must agree.
    Every impossible combination raises a one-line ``ValueError``; the result is validated.
    """
    if (steps is not None and steps < 1) or (delta_t is not None and delta_t < 1):
        raise ValueError(f"steps and delta_t must be >= 1, got steps={steps}, delta_t={delta_t}")
    cfg = base
    if name is not None:
        canon = SAMPLER_ALIASES.get(name, name)
        if canon not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLER_CHOICES)}, got {name!r}")
        if canon != base.name:
            d_steps, d_delta = SAMPLER_DEFAULTS[canon]
            cfg = replace(base, name=canon, steps=d_steps, delta_t=d_delta)
    if delta_t is not None:
        if T % delta_t:
            raise ValueError(f"--delta-t {delta_t} does not divide the model's {T} timesteps")
        if steps is not None and steps != T // delta_t:
            raise ValueError(f"--steps {steps} and --delta-t {delta_t} disagree ({T} / {delta_t} = {T // delta_t} "
                             f"steps); give one of them")
        cfg = replace(cfg, steps=0, delta_t=delta_t)
    elif steps is not None:
        cfg = replace(cfg, steps=steps)
    if cfg.name == "ddpm" and ((steps is not None and steps != T) or (delta_t is not None and delta_t != 1)):
        raise ValueError(f"ddpm samples over all {T} timesteps (delta_t 1); --steps/--delta-t choose ddim or dpm")
    cfg.num_steps(T)
    return cfg


FAST_SAMPLER = SamplerConfig(name="dpmpp2m", steps=20)
#: the sampler a newly trained bundle records as its default (``DiffusionRunConfig.sampler``):
#: DPM-Solver++(2M) in 15 steps, the fewest whose field stayed within 5 % of 200-step DDIM's on every
#: held-out demo patient (docs/synthesis.md)
DEFAULT_SAMPLER = SamplerConfig(name="dpmpp2m", steps=15)


@dataclass
class DiffusionModelConfig:
    """Everything needed to rebuild a trained diffusion model (stored in its checkpoints)."""

    target: str = "ref"  # ref: each phase relative to phase 00 (default); step: consecutive transitions
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # How the image latent conditions the UNet (respmotion.diffusion.model.ImageCondition):
    # plain = per-channel standardised (research code); deviation = minus the training patients'
    # voxel-wise mean image latent, over the across-patient std; both = the two concatenated.
    image_condition: str = "both"
    # Also condition on the CT's scalar lung anatomy (respmotion.anatomy.features: gas volume, column gas
    # heights), standardised over the training patients and given to the UNet as constant channels
    # (respmotion.diffusion.model.AnatomyCondition): the amplitude a CT predicts, learnable from tens of patients.
    anatomy_condition: bool = True
    # How DVF latents are standardised (respmotion.diffusion.sampling.LatentNorm): "phase" = mean and std per
    # phase and channel (the small residuals next to the reference phase weigh as much as end-exhale's),
    # "channel" = per channel over all phases (bundles written before the option)
    dvf_norm: str = "phase"

    def __post_init__(self) -> None:
        if self.target not in TARGET_MODES:
            raise ValueError(f"target must be one of {TARGET_MODES}, got {self.target!r}")
        if self.dvf_norm not in DVF_NORMS:
            raise ValueError(f"dvf_norm must be one of {DVF_NORMS}, got {self.dvf_norm!r}")
        if self.image_condition not in IMAGE_CONDITIONS:
            raise ValueError(f"image_condition must be one of {IMAGE_CONDITIONS}, got {self.image_condition!r}")


@dataclass
class LatentsConfig:
    """``respmotion latents``: encode a cohort into a mirror tree of latents."""

    data: str = ""  # cohort folder (respmotion.io.layout)
    image_ae: str = ""  # image autoencoder checkpoint (model.pt or <step>.pt)
    dvf_ae: str = ""  # DVF autoencoder checkpoint
    out: str = ""  # latent set folder
    fields: tuple[str, ...] = ("gt_ref", "gt_step")  # field sources (respmotion.training.data.field_source)
    image_phases: str = "reference"  # reference (phase 00 only: what synthesis conditions on) | all
    device: str = "auto"
    rank: int | None = None  # None: from torchrun's RANK (else 0)
    world_size: int | None = None  # None: from torchrun's WORLD_SIZE (else 1)
