"""Synthesis end to end at 50x256x256: seconds and peak memory.

``fixed`` (default): :func:`respmotion.synthesis.pipeline.synthesize` with a
:class:`~respmotion.synthesis.pipeline.FixedMotion` holding a phantom's exact fields -- what every
synthesis run costs besides the motion model: resampling, warping 10 phases, writing NIfTI + MHA
volumes and ITK fields and the summary (GIFs are timed by ``bench.render``).

``ldm``: the same with an **untrained default-size** latent diffusion bundle built in memory
(image AE + DVF VAE + phase-conditioned UNet, :class:`respmotion.diffusion.pipeline.MotionGenerator`)
and the fast sampler (DPM-Solver++(2M), 20 steps): encode the CT, sample 9 phases from one draw,
decode 9 fields, then the same warping and export.  On 2 CPU cores this takes many minutes, so
``python -m bench`` runs it only on CUDA unless asked by name (``--only synthesis_ldm``).

    python -m bench.synthesis [--device cpu|cuda] [--variant fixed|ldm] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

SHAPE = (50, 256, 256)


class GeneratorMotion:
    """:class:`~respmotion.synthesis.pipeline.MotionModel` over a diffusion ``MotionGenerator``."""

    def __init__(self, generator, shape, sampler) -> None:
        self.gen, self.shape, self.sampler = generator, tuple(shape), sampler

    def generate(self, ct, samples: int, seed: int):
        import torch

        from respmotion.core.types import DisplacementField

        res = self.gen.cycle(torch.from_numpy(ct.array), ct.geometry.spacing, self.sampler, seed, samples)
        f = res.fields.cpu().numpy()
        return [{k: DisplacementField(f[s, i], ct.geometry, {"source": "untrained ldm"}) for i, k in enumerate(res.phases)}
                for s in range(f.shape[0])]


def untrained_generator(device: str):
    """Default-size diffusion model and autoencoders with random weights (speed only)."""
    import torch

    from respmotion.diffusion.config import DiffusionModelConfig
    from respmotion.diffusion.model import LatentDiffusion
    from respmotion.diffusion.pipeline import MotionGenerator
    from respmotion.models.autoencoder import Autoencoder, default_net_config

    torch.manual_seed(0)
    diff = LatentDiffusion(DiffusionModelConfig()).to(device)
    image_ae = Autoencoder(default_net_config("image")).to(device)
    dvf_ae = Autoencoder(default_net_config("dvf")).to(device)
    return MotionGenerator(diff, image_ae, dvf_ae)


def run(device: str = "cpu", shape: tuple[int, int, int] = SHAPE, quick: bool = False, variant: str = "fixed",
        cache_dir: str | None = None, formats: tuple[str, ...] = ("nifti", "mha")) -> dict[str, Any]:
    """One synthesis of one sample (10 phases); ``quick`` writes only .mha files."""
    from bench.common import PeakRSS, cuda_peak_mb, environment, phantom_cycle, reset_cuda_peak

    from respmotion.core.types import DisplacementField, Volume
    from respmotion.diffusion.config import FAST_SAMPLER
    from respmotion.synthesis.pipeline import FixedMotion, SynthesisOptions, synthesize

    t0 = time.perf_counter()
    geom, cts, dvfs = phantom_cycle(tuple(shape), cache_dir)
    ct = Volume(cts[0], geom, {"source": "phantom seed 0"})
    if variant == "fixed":
        model = FixedMotion({k: DisplacementField(v, geom) for k, v in dvfs.items()}, tuple(shape))
        what = "FixedMotion (phantom exact fields)"
    elif variant == "ldm":
        model = GeneratorMotion(untrained_generator(device), shape, FAST_SAMPLER)
        what = f"untrained default-size LDM, sampler {FAST_SAMPLER.name} {FAST_SAMPLER.steps} steps"
    else:
        raise ValueError(f"variant must be fixed or ldm, got {variant!r}")
    del cts, dvfs
    setup_s = time.perf_counter() - t0
    fmts = ("mha",) if quick else tuple(formats)
    opts = SynthesisOptions(samples=1, seed=0, formats=fmts)
    with tempfile.TemporaryDirectory(prefix="respmotion-bench-synth-") as out:
        reset_cuda_peak(device)
        with PeakRSS() as mem:
            t1 = time.perf_counter()
            res = synthesize(ct, model, out, opts)
            seconds = time.perf_counter() - t1
        from pathlib import Path

        files = [p for p in Path(out).rglob("*") if p.is_file()]
        written_mb = sum(p.stat().st_size for p in files) / 2**20
    return {
        "variant": variant, "motion": what, "shape_zyx": list(shape), "formats": list(fmts), "render": False,
        "setup_s": round(setup_s, 2), "seconds": round(seconds, 2),
        "seconds_generate": round(res.summary.get("seconds_generate", float("nan")), 2),
        "files_written": len(files), "written_mb": round(written_mb, 1),
        **mem.to_dict(), "cuda_peak_mb": cuda_peak_mb(device), "env": environment(device),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", default="fixed", choices=("fixed", "ldm"))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(run(a.device, quick=a.quick, variant=a.variant), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
