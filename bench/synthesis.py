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

    python -m bench.synthesis [--device cpu|cuda] [--variant fixed|ldm] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import numpy as np

SHAPE = (50, 256, 256)


class GeneratorMotion:
    """:class:`~respmotion.synthesis.pipeline.MotionModel` over a ``ref``-mode diffusion ``MotionGenerator``
    without a motion prior (the untrained bundle), timing its stages (``seconds``: encode, sample, decode):
    the steps of :meth:`MotionGenerator.cycle` called one by one."""

    resamples_input = False

    def __init__(self, generator, shape, sampler) -> None:
        self.gen, self.shape, self.sampler = generator, tuple(shape), sampler
        self.seconds: dict[str, float] = {}

    def generate(self, ct, samples: int, seed: int):
        import torch

        from respmotion.core.types import DisplacementField
        from respmotion.io.layout import PHASES

        t0 = time.perf_counter()
        img = self.gen.encode_image(torch.from_numpy(ct.array))
        t1 = time.perf_counter()
        lat = self.gen.sample_latents(img, PHASES[1:], self.sampler, seed, samples)
        t2 = time.perf_counter()
        moving = self.gen.decode(lat).cpu().numpy()  # (S, 9, 3, Z, Y, X) mm
        t3 = time.perf_counter()
        self.seconds = {"encode": round(t1 - t0, 2), "sample": round(t2 - t1, 2), "decode": round(t3 - t2, 2),
                        "decode_per_phase": round((t3 - t2) / (samples * (len(PHASES) - 1)), 2)}
        zero = np.zeros_like(moving[:, :1])
        f = np.concatenate([zero, moving], 1)
        return [{k: DisplacementField(f[s, i], ct.geometry, {"source": "untrained ldm"}) for i, k in enumerate(PHASES)}
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
        cache_dir: str | None = None, formats: tuple[str, ...] = ("nifti", "mha"), steps: int = 20) -> dict[str, Any]:
    """One synthesis of one sample (10 phases); ``quick`` writes only .mha files.  ``ldm``: DPM-Solver++(2M)
    with ``steps`` steps; the record splits the time into encode / sample / decode / warp and write and
    gives the seconds per network evaluation (sample / steps) and the cycle composed for 20 and 200 steps."""
    from bench.common import PeakRSS, cuda_peak_mb, environment, phantom_cycle, reset_cuda_peak

    from respmotion.core.types import DisplacementField, Volume
    from respmotion.diffusion.config import SamplerConfig
    from respmotion.synthesis.pipeline import FixedMotion, SynthesisOptions, synthesize

    t0 = time.perf_counter()
    geom, cts, dvfs = phantom_cycle(tuple(shape), cache_dir)
    ct = Volume(cts[0], geom, {"source": "phantom seed 0"})
    if variant == "fixed":
        model = FixedMotion({k: DisplacementField(v, geom) for k, v in dvfs.items()}, tuple(shape))
        what = "FixedMotion (phantom exact fields)"
    elif variant == "ldm":
        sampler = SamplerConfig(name="dpmpp2m", steps=steps)
        model = GeneratorMotion(untrained_generator(device), shape, sampler)
        what = f"untrained default-size LDM, sampler {sampler.name} {sampler.steps} steps"
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
        "seconds_warp_and_write": round(res.summary.get("seconds_warp_and_write", float("nan")), 2),
        **(_stages(model.seconds, steps, res.summary["seconds_warp_and_write"]) if variant == "ldm" else {}),
        "files_written": len(files), "written_mb": round(written_mb, 1),
        **mem.to_dict(), "cuda_peak_mb": cuda_peak_mb(device), "env": environment(device),
    }


def _stages(seconds: dict[str, float], steps: int, write_s: float) -> dict[str, Any]:
    """Stage times, seconds per network evaluation (9 phases in one batch), the cycle composed for 20 / 200 steps."""
    per_eval = seconds["sample"] / steps
    fixed = seconds["encode"] + seconds["decode"] + write_s
    return {"stages_s": seconds, "seconds_per_network_evaluation_batch9": round(per_eval, 2),
            "cycle_composed_s": {n: round(fixed + n * per_eval, 1) for n in (20, 200)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", default="fixed", choices=("fixed", "ldm"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=20, help="ldm: DPM-Solver++ steps actually run")
    a = p.parse_args(argv)
    print(json.dumps(run(a.device, quick=a.quick, variant=a.variant, steps=a.steps), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
