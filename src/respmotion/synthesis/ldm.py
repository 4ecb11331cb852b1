"""The latent-diffusion motion model as a synthesis :class:`~respmotion.synthesis.pipeline.MotionModel`.

A model bundle is a diffusion checkpoint (``model.pt``, ``<step>.pt`` or its run folder); the two
autoencoders it was trained with are found through the latent set's provenance recorded in it, and
so is the motion prior (``extra["motion_prior"]``: path and sha256 of ``motion_prior.npy``, checked
on load; :mod:`respmotion.models.prior`).  The model works at ``extra["input_shape"]`` (the prior's
grid, recorded since the prior exists) unless ``shape`` is given; a bundle with a prior only runs
at the prior's shape.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.types import DisplacementField, Volume

DEFAULT_SHAPE = (50, 256, 256)


class DiffusionMotion:
    """Wraps :class:`respmotion.diffusion.pipeline.MotionGenerator`; one coherent cycle per sample."""

    resamples_input = False

    def __init__(self, generator, sampler=None, shape: tuple[int, int, int] | None = None) -> None:
        self.generator = generator
        self.sampler = sampler or generator.default_sampler
        recorded = generator.extra.get("input_shape")
        self.shape = tuple(shape or recorded or DEFAULT_SHAPE)

    def generate(self, ct: Volume, samples: int, seed: int) -> list[dict[int, DisplacementField]]:
        res = self.generator.cycle(torch.as_tensor(ct.array), ct.geometry.spacing, self.sampler, seed, samples)
        fields = res.fields.cpu().numpy()  # (S, P, 3, Z, Y, X) mm
        return [{k: DisplacementField(fields[s, i], ct.geometry, {"sample": s, "phase": k})
                 for i, k in enumerate(res.phases)} for s in range(fields.shape[0])]

    def prior_fields(self, ct: Volume) -> dict[int, DisplacementField] | None:
        """The model's motion prior for ``ct`` without the network (``None`` when it has none): a baseline the
        evaluation reports beside the samples, to show what the network adds."""
        fields = self.generator.prior_cycle(torch.as_tensor(ct.array), ct.geometry.spacing)
        if fields is None:
            return None
        arr = fields.cpu().numpy()
        return {k: DisplacementField(arr[i], ct.geometry, {"phase": k, "source": "motion prior"})
                for i, k in enumerate(range(0, 100, 10))}

    def describe(self) -> dict:
        """What summary.json records about the motion: sampler, its steps (network evaluations per
        trajectory), delta_t, eta, the model grid and the networks' precision."""
        dtype = self.generator.precision
        return {"kind": "latent diffusion", "sampler": self.sampler.name,
                "steps": self.sampler.num_steps(self.generator.schedule.T), "delta_t": self.sampler.delta_t,
                "eta": self.sampler.eta, "model_shape": list(self.shape),
                "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch.")}


def load_bundle(path: str | Path, device: str = "cpu", sampler: str | None = None, steps: int | None = None,
                shape: tuple[int, int, int] | None = None, delta_t: int | None = None,
                precision: str = "fp32") -> DiffusionMotion:
    """Load a trained diffusion model bundle (its ``model.pt``, a ``<step>.pt`` or the run folder: its ``model.pt``,
    else its newest ``<step>.pt``); ``sampler`` / ``steps`` / ``delta_t`` override its default
    sampler (:func:`respmotion.diffusion.config.choose_sampler`: one-line ``ValueError`` when impossible);
    ``precision`` (``fp32``, ``bf16``, ``auto``: :func:`respmotion.runtime.resolve_precision`) is the networks'."""
    from ..diffusion.config import choose_sampler
    from ..diffusion.pipeline import MotionGenerator
    from ..io.checkpoint import run_weights
    from ..runtime import resolve_precision

    p = Path(path)
    dtype = resolve_precision(precision, device)
    if not p.exists():
        raise FileNotFoundError(f"{p}: model bundle not found")
    ckpt = run_weights(p, kind="model bundle")
    gen = MotionGenerator.from_checkpoints(ckpt, device=device)
    try:
        cfg = choose_sampler(gen.default_sampler, gen.schedule.T, sampler, steps, delta_t)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None
    return DiffusionMotion(gen.set_precision(dtype), cfg, shape)
