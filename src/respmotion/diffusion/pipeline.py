"""What the synthesis stage calls: CT in, a coherent breathing cycle of displacement fields out.

    gen = MotionGenerator.from_checkpoints("runs/diffusion/<run>/model.pt", device="cuda")
    fields = gen.cycle(ct_hu, spacing_zyx, sampler=SamplerConfig(name="dpmpp2m", steps=20), seed=0)
    # fields: (S, 10, 3, Z, Y, X) float32 mm, phase k relative to phase 00 (pull: phase_k(p) =
    # ct(p + u_k(p))), phases 00, 10, ..., 90; fields[:, 0] == 0.

Steps: encode the CT with the image autoencoder (HU -> scaled latent -> normalised), sample the
normalised DVF latents of every phase from **one draw** (:func:`~respmotion.diffusion.sampling.sample_cycles`),
denormalise and decode them with the DVF autoencoder into mm.  In ``ref`` mode (default) phase
00 is the identity and is not sampled.  In ``step`` mode the ten transitions k -> k + 10 are
sampled and chained by composition (:func:`respmotion.core.warp.compose`, never a sum):
``ref_{k+1} = compose(ref_k, step_k)``; ``closure_mm`` reports how far the composed 90 -> 00
transition is from closing the cycle.

Motion prior (default): the DVF autoencoder codes the residual of each target to what the training
patients' fields predict for the CT (:mod:`respmotion.models.prior`); :meth:`MotionGenerator.decode`
adds the prior back, so an untrained or uncertain model falls back to the population mean, not
to "no motion" (the measurements behind this design: ``docs/diffusion.md``).
Precision: :meth:`MotionGenerator.set_precision` runs the three networks under ``torch.autocast`` in bfloat16
(channels-last 3-D weights), about twice as fast on a CPU with bf16 instructions and on recent GPUs, fields
within about 1 % of fp32 (docs/synthesis.md); the default is fp32.
The research code's setting (full field, plain image condition, epsilon) remains selectable:
``data.motion_prior=none`` (DVF autoencoder), ``model.image_condition=plain`` and
``model.schedule.prediction_type=epsilon`` (diffusion).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..anatomy.features import FEATURE_LIMIT, lung_features, outside_training
from ..config import from_dict
from ..core import warp as W
from ..io.layout import PHASES
from ..io.torchfile import load_state
from ..models.prior import MotionPrior, prior_from_record
from .config import DiffusionModelConfig, SamplerConfig
from .model import LatentDiffusion
from .latents import field_kind
from .sampling import sample_cycles
from .unet import phase_index
from .schedulers import NoiseSchedule, make_sampler

log = logging.getLogger("respmotion")


def load_diffusion(path: str | Path, device: str | torch.device = "cpu") -> tuple[LatentDiffusion, dict[str, Any]]:
    """Rebuild :class:`LatentDiffusion` from a checkpoint (``model.pt`` or ``<step>.pt``); eval mode."""
    from ..io.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location=device)
    if ckpt.get("task") != "diffusion":
        raise ValueError(f"{path}: a checkpoint of task {ckpt.get('task')!r}, not a diffusion model")
    mc = dict(ckpt["model_config"])
    ema_decay = float(mc.pop("ema_decay", 0.999))
    mc.setdefault("image_condition", "plain")  # bundles written before the option conditioned on "plain"
    mc.setdefault("anatomy_condition", False)  # bundles written before the option had no anatomy channels
    mc.setdefault("dvf_norm", "channel")  # ... and per-channel latent statistics
    sd = ckpt["model"]
    mean, std = sd.get("image_condition.mean"), sd.get("image_condition.std")
    model = LatentDiffusion(from_dict(DiffusionModelConfig, mc), ema_decay=ema_decay,
                            image_mean=None if mean is None else torch.zeros_like(mean),
                            image_std=None if std is None else torch.ones_like(std))
    load_state(model, ckpt["model"], path)  # weights that do not fit: one line naming the file
    return model.to(device).eval(), dict(ckpt.get("extra", {}))


@dataclass
class CycleResult:
    """``fields`` (S, P, 3, Z, Y, X) mm relative to phase 00 for ``phases``; ``steps`` the sampled
    transitions in step mode (S, 10, 3, Z, Y, X) else None; ``closure_mm`` mean |composed cycle|
    per sample in step mode."""

    phases: list[int]
    fields: torch.Tensor
    steps: torch.Tensor | None = None
    closure_mm: list[float] | None = None


class MotionGenerator:
    """Diffusion model + the two autoencoders it was trained with."""

    def __init__(self, diffusion: LatentDiffusion, image_ae: torch.nn.Module, dvf_ae: torch.nn.Module,
                 extra: dict[str, Any] | None = None, prior: MotionPrior | None = None) -> None:
        self.diffusion, self.image_ae, self.dvf_ae = diffusion.eval(), image_ae.eval(), dvf_ae.eval()
        self.extra = extra or {}
        self.prior = prior  # the DVF autoencoder codes u - prior[id]; decode adds it back
        self.target = diffusion.cfg.target
        self.schedule = NoiseSchedule(diffusion.cfg.schedule)
        self.device = next(diffusion.parameters()).device
        self.precision: torch.dtype | None = None  # autocast dtype of the networks (set_precision); None: fp32

    def set_precision(self, dtype: torch.dtype | None) -> "MotionGenerator":
        """Run the networks in ``dtype`` (``torch.bfloat16``; from :func:`respmotion.runtime.resolve_precision`)
        under autocast, their weights channels-last (oneDNN's fast layout for bf16 3-D convolutions), or in fp32
        (``None``).  Weights stay fp32; sampler arithmetic and the returned fields are fp32.  Returns ``self``."""
        layout = torch.contiguous_format if dtype is None else torch.channels_last_3d
        for net in (self.diffusion.unet, self.diffusion.ema, self.image_ae, self.dvf_ae):
            net.to(memory_format=layout)
        self.precision = dtype
        return self

    def _autocast(self) -> torch.autocast:
        on = self.precision is not None
        return torch.autocast(self.device.type, dtype=self.precision if on else torch.bfloat16, enabled=on)

    @classmethod
    def from_checkpoints(cls, diffusion_path: str | Path, image_ae_path: str | Path | None = None,
                         dvf_ae_path: str | Path | None = None, device: str | torch.device = "cpu") -> "MotionGenerator":
        """Autoencoder paths default to those recorded in the latent set's provenance; so does the
        motion prior (path and sha256, checked), which must match the DVF autoencoder's record.  When a
        recorded file is gone (the run tree was moved or copied), it is looked for by its relative path
        beside the bundle (autoencoders) or the DVF autoencoder (prior) and accepted if its sha256 matches."""
        from ..io.checkpoint import load_checkpoint, recorded_file
        from ..models.autoencoder import load_autoencoder

        model, extra = load_diffusion(diffusion_path, device)
        prov = extra.get("latent_provenance", {})
        paths = []
        for given, key in ((image_ae_path, "image_autoencoder"), (dvf_ae_path, "dvf_autoencoder")):
            record = prov.get(key) or {}
            if not given and not record.get("path"):
                raise ValueError(f"{diffusion_path}: no {key.replace('_', ' ')} recorded; pass its checkpoint")
            # a moved run tree: the recorded file beside the bundle (relpath), if its sha256 matches
            paths.append(given or recorded_file(record, Path(diffusion_path).parent))
        recorded = (prov.get("dvf_autoencoder") or {}).get("motion_prior")
        own = (load_checkpoint(paths[1]).get("extra") or {}).get("motion_prior")
        if (recorded or {}).get("sha256") != (own or {}).get("sha256"):
            raise ValueError(f"{diffusion_path}: its latents were made with motion prior {recorded}, but the DVF "
                             f"autoencoder {paths[1]} records {own}")
        prior = prior_from_record(recorded, Path(paths[1]).parent)
        return cls(model, load_autoencoder(str(paths[0]), device), load_autoencoder(str(paths[1]), device), extra,
                   prior)

    @property
    def default_sampler(self) -> SamplerConfig:
        return from_dict(SamplerConfig, self.extra["sampler"]) if "sampler" in self.extra else SamplerConfig()

    def features(self, ct_hu: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor | None:
        """The CT's lung features ``(F,)`` (:func:`respmotion.anatomy.features.lung_features`) when the model reads
        them (anatomy condition or regressed prior), else ``None``.  A feature more than
        :data:`~respmotion.anatomy.features.FEATURE_LIMIT` sd from the training patients' mean is named in one
        warning: the model clips it and does not extrapolate."""
        if self.diffusion.anatomy is None and not (self.prior is not None and self.prior.needs_features):
            return None
        f = lung_features(ct_hu.cpu().numpy(), spacing)
        if self.diffusion.anatomy is not None:
            mean, std = self.diffusion.anatomy.mean.tolist(), self.diffusion.anatomy.std.tolist()
        else:
            mean, std = self.prior.feature_mean.tolist(), self.prior.feature_std.tolist()
        far = outside_training(f, mean, std, FEATURE_LIMIT)
        if far:
            log.warning("this CT lies outside the patients the diffusion model was trained on: %s; the model clips "
                        "it to %g sd, so its motion is that of its most extreme training patients (a model trained "
                        "on phantoms does not fit real CTs: --model default is the calibrated one)",
                        "; ".join(far), FEATURE_LIMIT)
        return torch.from_numpy(f).float()

    @torch.no_grad()
    def encode_image(self, ct_hu: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """CT ``(Z, Y, X)`` HU -> the UNet's condition ``(Ci * m [+ F], Z', Y', X')``: the image latent
        (:class:`respmotion.diffusion.model.ImageCondition`) and, for a model conditioned on anatomy, the CT's
        lung ``features`` (:meth:`features`)."""
        if self.diffusion.anatomy is not None and features is None:
            raise ValueError("this diffusion model is conditioned on the CT's lung features: pass features")
        with self._autocast():
            z = self.image_ae.encode_latent(ct_hu.to(self.device, torch.float32)[None, None]).float()
        return self.diffusion.condition(z, None if self.diffusion.anatomy is None else features[None])[0]

    #: voxels decoded at once (batch x field size): one field at 50x256x256, dozens at the demo's 16x64x64
    DECODE_VOXELS = 1 << 22

    def decode_batch(self, shape: Sequence[int]) -> int:
        """Fields decoded per DVF decoder call for a grid of ``shape`` (z, y, x) (memory-bounded)."""
        return max(1, self.DECODE_VOXELS // max(1, math.prod(int(n) for n in shape)))

    @torch.no_grad()
    def decode(self, latents_n: torch.Tensor, batch: int = 1, field_ids: Sequence[str] | None = None,
               features: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised DVF latents ``(..., P, Cd, Z', Y', X')`` -> fields ``(..., P, 3, Z, Y, X)`` in mm.

        With a motion prior, ``field_ids`` (P ids such as ``"ref_40"``, one per phase axis entry)
        name the prior field added to each decoded residual; a regressed prior needs the CT's lung ``features``.
        """
        lead = latents_n.shape[:-4]
        flat = latents_n.reshape(-1, *latents_n.shape[-4:])
        norm = self.diffusion.dvf_norm
        phase = None
        if norm.per_phase:
            if field_ids is None or len(field_ids) != lead[-1]:
                raise ValueError(f"per-phase latent statistics need one field id per phase ({lead[-1]}), got {field_ids}")
            idx = torch.tensor([phase_index(field_kind(f)[1]) for f in field_ids], device=self.device)
            phase = idx.repeat(flat.shape[0] // len(field_ids))  # (..., P) flattened phase-fastest
        with self._autocast():
            outs = [self.dvf_ae.decode_latent(norm.denormalize(flat[i:i + batch].to(self.device),
                                                               None if phase is None else phase[i:i + batch])).float()
                    for i in range(0, flat.shape[0], batch)]
        out = torch.cat(outs, 0).float()
        out = out.reshape(*lead, *out.shape[1:])
        if self.prior is None:
            return out
        if field_ids is None or len(field_ids) != out.shape[-5]:
            raise ValueError(f"decoding with a motion prior needs one field id per phase ({out.shape[-5]}), "
                             f"got {field_ids}")
        self.prior.check_shape(out.shape[-3:], "decoded field")
        return self.prior.restore(field_ids, out, None if features is None else features.tolist())

    @torch.no_grad()
    def sample_latents(self, image_latent_n: torch.Tensor, phases: Sequence[int], sampler: SamplerConfig | None = None,
                       seed: int = 0, num_samples: int = 1) -> torch.Tensor:
        """Normalised DVF latents ``(S, P, Cd, Z', Y', X')``, one draw per sample (see sampling)."""
        cfg = sampler or self.default_sampler
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        net = self.diffusion.sampling_net(cfg.use_ema)
        with self._autocast():
            lat = sample_cycles(net, image_latent_n, list(phases), make_sampler(self.schedule, cfg), gen,
                                num_samples, cfg.shared_noise)
        return lat.float()

    @torch.no_grad()
    def prior_cycle(self, ct_hu: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor | None:
        """The motion prior alone for a CT (what the network starts from, no sampling): ``(10, 3, Z, Y, X)`` mm for
        phases 00..90 relative to 00, or ``None`` for a model without a prior or in step mode."""
        if self.prior is None or self.target != "ref":
            return None
        features = self.features(ct_hu, spacing)
        ids = [f"ref_{k:02d}" for k in PHASES[1:]]
        moving = self.prior.stack(ids, features=None if features is None else features.tolist())
        return torch.cat([torch.zeros_like(moving[:1]), moving], 0)

    @torch.no_grad()
    def cycle(self, ct_hu: torch.Tensor, spacing: Sequence[float], sampler: SamplerConfig | None = None,
              seed: int = 0, num_samples: int = 1) -> CycleResult:
        """Reference-relative fields of phases 00..90 for a CT ``(Z, Y, X)`` HU with ``spacing`` (z, y, x) mm."""
        features = self.features(ct_hu, spacing)
        img = self.encode_image(ct_hu, features)
        phases = list(PHASES)
        if self.target == "ref":
            lat = self.sample_latents(img, phases[1:], sampler, seed, num_samples)
            moving = self.decode(lat, self.decode_batch(ct_hu.shape), [f"ref_{k:02d}" for k in phases[1:]], features)
            zero = torch.zeros_like(moving[:, :1])
            return CycleResult(phases, torch.cat([zero, moving], 1))
        lat = self.sample_latents(img, phases, sampler, seed, num_samples)
        steps = self.decode(lat, self.decode_batch(ct_hu.shape), [f"step_{k:02d}" for k in phases], features)  # k -> k + 10
        refs = [torch.zeros_like(steps[:, 0])]
        for k in range(len(phases) - 1):
            refs.append(W.compose(refs[-1], steps[:, k], spacing))
        closed = W.compose(refs[-1], steps[:, -1], spacing)
        closure = [float(c.norm(dim=0).mean()) for c in closed]
        return CycleResult(phases, torch.stack(refs, 1), steps, closure)
