"""Typed configuration of the latent diffusion stage (loaded through :mod:`respmotion.config`).

Sections: ``unet`` (the network), ``schedule`` (forward process), ``sampler`` (reverse process),
plus the target mode.  Defaults are the research code's (SPEC §3): 12 -> 9 channels, base 64
channels, 3 levels, T = 1000 linear betas, DDIM with stride ``delta_t`` = 5; except the
prediction target, x0 instead of epsilon (see :class:`ScheduleConfig`), and the image condition
(:class:`DiffusionModelConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TARGET_MODES = ("ref", "step")
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
IMAGE_CONDITIONS = ("plain", "deviation", "both")
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
    channels: tuple[int, ...] = (64, 128, 256)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 2
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


FAST_SAMPLER = SamplerConfig(name="dpmpp2m", steps=20)


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

    def __post_init__(self) -> None:
        if self.target not in TARGET_MODES:
            raise ValueError(f"target must be one of {TARGET_MODES}, got {self.target!r}")
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
    rank: int = -1  # -1: from torchrun's RANK (else 0)
    world_size: int = -1  # -1: from torchrun's WORLD_SIZE (else 1)
