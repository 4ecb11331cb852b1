"""Synthesis end to end at 50x256x256: seconds and peak memory.

``fixed`` (default): :func:`respmotion.synthesis.pipeline.synthesize` with a
:class:`~respmotion.synthesis.pipeline.FixedMotion` holding a phantom's exact fields -- what every
synthesis run costs besides the motion model: resampling, warping 10 phases, writing NIfTI + MHA
volumes and ITK fields and the summary (GIFs are timed by ``bench.render``).

``ldm``: the same with an **untrained default-size** latent diffusion bundle built in memory
(image AE + DVF VAE + phase-conditioned UNet at their default configs, the DVF decoder with
``--dvf-coarse-levels`` (3, the model-grid choice of docs/synthesis.md),
:class:`respmotion.diffusion.pipeline.MotionGenerator`) and the fast sampler (DPM-Solver++(2M),
the default steps): the CT read from a NIfTI file, encoded, 9 phases sampled from one draw, 9
fields decoded, then the same warping and export; ``seconds`` runs from reading the CT file to the
last phase written.  ``--reference-ddim N`` then samples the same model from the same noise with
DDIM in N steps for ``--reference-phases`` (default 2 phases, to bound the time: say so in the
JSON) and reports ``mean |u_fast - u_ddim| / mean |u_ddim|`` over the CT's lungs
(:func:`respmotion.anatomy.masks.lung_mask`).  The weights are untrained, so the check measures the
sampler's agreement on this network, not a trained model's (``bench.model_cost sampler`` does that
at the demo size).  ``--precision bf16`` runs the networks in bfloat16
(:meth:`respmotion.diffusion.pipeline.MotionGenerator.set_precision`) and then samples
``--reference-phases`` again in fp32 from the same noise: ``precision_check`` gives the same relative
difference against that fp32 field.  On 2 CPU cores the default-size network takes minutes, so ``python -m bench``
runs it only on CUDA unless asked by name (``--only synthesis_ldm``).

    python -m bench.synthesis [--device cpu|cuda] [--variant fixed|ldm] [--steps N] [--quick]
                              [--reference-ddim 200 [--reference-phases 10,50]] [--precision fp32|bf16|auto]
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
    (the untrained bundle, or a trained one given by path), timing its stages (``seconds``: encode, sample, decode):
    the steps of :meth:`MotionGenerator.cycle` called one by one."""

    resamples_input = False

    def __init__(self, generator, shape, sampler) -> None:
        self.gen, self.shape, self.sampler = generator, tuple(shape), sampler
        self.seconds: dict[str, float] = {}
        self.image_latent = None  # kept for the reference sampler
        self.moving = None  # (S, 9, 3, Z, Y, X) mm, phases 10..90

    def generate(self, ct, samples: int, seed: int):
        import torch

        from respmotion.core.types import DisplacementField
        from respmotion.io.layout import PHASES

        t0 = time.perf_counter()
        hu = torch.from_numpy(ct.array)
        features = self.gen.features(hu, ct.geometry.spacing)
        img = self.gen.encode_image(hu, features)
        t1 = time.perf_counter()
        lat = self.gen.sample_latents(img, PHASES[1:], self.sampler, seed, samples)
        t2 = time.perf_counter()
        moving = self.gen.decode(lat, field_ids=[f"ref_{k:02d}" for k in PHASES[1:]], features=features).cpu().numpy()  # (S, 9, 3, Z, Y, X) mm
        t3 = time.perf_counter()
        self.seconds = {"encode": round(t1 - t0, 2), "sample": round(t2 - t1, 2), "decode": round(t3 - t2, 2),
                        "decode_per_phase": round((t3 - t2) / (samples * (len(PHASES) - 1)), 2)}
        self.image_latent, self.features, self.moving = img, features, moving
        zero = np.zeros_like(moving[:, :1])
        f = np.concatenate([zero, moving], 1)
        return [{k: DisplacementField(f[s, i], ct.geometry, {"source": "untrained ldm"}) for i, k in enumerate(PHASES)}
                for s in range(f.shape[0])]


#: the DVF decoder's coarse levels at the model grid (docs/synthesis.md; the library default counts
#: voxels and stays at full resolution for the small demo and CI grids)
DVF_COARSE_LEVELS = 3


def untrained_generator(device: str, dvf_coarse_levels: int = DVF_COARSE_LEVELS):
    """Default-size diffusion model and autoencoders with random weights (speed, and the samplers'
    agreement on this network); the DVF decoder with ``dvf_coarse_levels`` coarse levels."""
    import torch

    from respmotion.diffusion.config import DiffusionModelConfig
    from respmotion.diffusion.model import LatentDiffusion
    from respmotion.diffusion.pipeline import MotionGenerator
    from respmotion.models.autoencoder import Autoencoder, default_net_config

    torch.manual_seed(0)
    diff = LatentDiffusion(DiffusionModelConfig())
    # MONAI zero-initialises the UNet's output and residual-branch convolutions, so an untrained model
    # predicts x0 = 0 whatever its input and every sampler returns the same field: give those
    # convolutions their default random initialisation so that the reference check compares samplers
    for m in diff.unet.modules():
        if isinstance(m, torch.nn.Conv3d) and not m.weight.detach().any():
            m.reset_parameters()
    diff.ema.load_state_dict(diff.unet.state_dict())
    diff = diff.to(device)
    image_ae = Autoencoder(default_net_config("image")).to(device)
    dvf_ae = Autoencoder(default_net_config("dvf", coarse_levels=dvf_coarse_levels)).to(device)
    return MotionGenerator(diff, image_ae, dvf_ae)


def reference_check(model: GeneratorMotion, ct_hu: np.ndarray, sampler, phases: tuple[int, ...], reference: str,
                    seed: int = 0, reencode: bool = False) -> dict[str, Any]:
    """Fields for ``phases`` from the same model and noise (``seed``) as the fast run of ``model``, sampled with
    ``sampler`` (a :class:`~respmotion.diffusion.config.SamplerConfig`) in the generator's current precision
    (``reencode``: the image latent encoded again in it, else the fast run's): ``mean |u_fast - u_ref| /
    mean |u_ref|`` over the lungs of ``ct_hu``; ``reference`` says what the reference is."""
    import torch

    from respmotion.anatomy.masks import lung_mask
    from respmotion.io.layout import PHASES

    t0 = time.perf_counter()
    img = model.gen.encode_image(torch.from_numpy(ct_hu), model.features) if reencode else model.image_latent
    lat = model.gen.sample_latents(img, phases, sampler, seed, 1)
    ref = model.gen.decode(lat, field_ids=[f"ref_{k:02d}" for k in phases], features=model.features)[0].cpu()  # (P, 3, Z, Y, X) mm
    fast = torch.from_numpy(model.moving[0, [PHASES.index(k) - 1 for k in phases]])
    lung = torch.from_numpy(lung_mask(ct_hu) > 0)
    diff = (fast - ref).norm(dim=1)[:, lung]
    size = ref.norm(dim=1)[:, lung]
    return {"reference": f"{reference}, same model and noise (seed {seed})",
            "phases": list(phases), "restricted": f"{len(phases)} of 9 phases, to bound the reference's time",
            "lung_voxels": int(lung.sum()), "mean_abs_u_reference_mm": round(float(size.mean()), 4),
            "rel_diff": round(float(diff.mean() / size.mean()), 4),
            "rel_diff_per_phase": {str(k): round(float(d.mean() / u.mean()), 4) for k, d, u in zip(phases, diff, size)},
            "within_5_percent": bool(diff.mean() <= 0.05 * size.mean()), "seconds": round(time.perf_counter() - t0, 1)}


def run(device: str = "cpu", shape: tuple[int, int, int] = SHAPE, quick: bool = False, variant: str = "fixed",
        cache_dir: str | None = None, formats: tuple[str, ...] = ("nifti", "mha"), steps: int = 0,
        reference_ddim: int = 0, reference_phases: tuple[int, ...] = (10, 50), bundle: str = "",
        dvf_coarse_levels: int = DVF_COARSE_LEVELS, precision: str = "fp32") -> dict[str, Any]:
    """One synthesis of one sample (10 phases); ``quick`` writes only .mha files.  ``ldm``: DPM-Solver++(2M)
    with ``steps`` steps (0: :data:`respmotion.diffusion.config.DEFAULT_SAMPLER`); the record
    splits the time into read / encode / sample / decode / warp and write, gives the seconds per network
    evaluation (sample / steps) and the cycle composed for 10, 20 and 200 steps, and with
    ``reference_ddim`` the field check against DDIM (:func:`reference_check`); ``precision`` other than fp32:
    the networks' precision, and the field check against fp32 (``precision_check``).  ``bundle``: a trained
    ``ref``-mode diffusion bundle instead of the untrained default-size one (``shape`` must then be
    its grid)."""
    from pathlib import Path

    from bench.common import PeakRSS, cuda_peak_mb, environment, phantom_cycle, reset_cuda_peak

    from respmotion.core.types import DisplacementField, Volume
    from respmotion.diffusion.config import DEFAULT_SAMPLER, SamplerConfig
    from respmotion.io.volumes import load_volume, save_volume
    from respmotion.runtime import resolve_precision
    from respmotion.synthesis.pipeline import FixedMotion, SynthesisOptions, synthesize

    steps = steps or DEFAULT_SAMPLER.steps

    t0 = time.perf_counter()
    geom, cts, dvfs = phantom_cycle(tuple(shape), cache_dir)
    ct = Volume(cts[0], geom, {"source": "phantom seed 0"})
    if variant == "fixed":
        model = FixedMotion({k: DisplacementField(v, geom) for k, v in dvfs.items()}, tuple(shape))
        what = "FixedMotion (phantom exact fields)"
    elif variant == "ldm":
        sampler = SamplerConfig(name="dpmpp2m", steps=steps)
        if bundle:
            from respmotion.diffusion.pipeline import MotionGenerator
            from respmotion.io.checkpoint import latest_checkpoint

            model = GeneratorMotion(MotionGenerator.from_checkpoints(latest_checkpoint(Path(bundle)), device=device),
                                    shape, sampler)
            what = f"trained LDM {bundle}, sampler {sampler.name} {sampler.steps} steps"
        else:
            model = GeneratorMotion(untrained_generator(device, dvf_coarse_levels), shape, sampler)
            what = (f"untrained default-size LDM, DVF decoder coarse_levels {dvf_coarse_levels} (random weights: the "
                    f"reference check is not evidence of a trained model's), sampler {sampler.name} {sampler.steps} steps")
    else:
        raise ValueError(f"variant must be fixed or ldm, got {variant!r}")
    dtype = resolve_precision(precision, device)
    if variant == "ldm":
        model.gen.set_precision(dtype)
        what += f", networks in {'fp32' if dtype is None else 'bf16'}"
    elif dtype is not None:
        raise ValueError(f"--precision {precision}: the fixed variant runs no network")
    del cts, dvfs
    setup_s = time.perf_counter() - t0
    fmts = ("mha",) if quick else tuple(formats)
    opts = SynthesisOptions(samples=1, seed=0, formats=fmts)
    reference = {}
    with tempfile.TemporaryDirectory(prefix="respmotion-bench-synth-") as tmp:
        ct_file = save_volume(ct, Path(tmp) / "ct.nii.gz")
        out = Path(tmp) / "out"
        reset_cuda_peak(device)
        with PeakRSS() as mem:
            t1 = time.perf_counter()
            ct_in = load_volume(ct_file)
            read_s = time.perf_counter() - t1
            res = synthesize(ct_in, model, out, opts)
            seconds = time.perf_counter() - t1
        files = [p for p in out.rglob("*") if p.is_file()]
        written_mb = sum(p.stat().st_size for p in files) / 2**20
    if variant == "ldm" and reference_ddim:
        ddim = SamplerConfig(name="ddim", steps=reference_ddim)
        reference["reference_check"] = reference_check(model, ct.array, ddim, tuple(reference_phases),
                                                       f"ddim {reference_ddim} steps")
    if variant == "ldm" and dtype is not None:
        model.gen.set_precision(None)
        reference["precision_check"] = reference_check(model, ct.array, sampler, tuple(reference_phases),
                                                       f"fp32 (image latent encoded again), {sampler.name} "
                                                       f"{sampler.steps} steps", reencode=True)
        model.gen.set_precision(dtype)
    return {
        "variant": variant, "motion": what, "shape_zyx": list(shape), "formats": list(fmts), "render": False,
        "setup_s": round(setup_s, 2), "seconds": round(seconds, 2), "seconds_read_ct": round(read_s, 2),
        "seconds_generate": round(res.summary.get("seconds_generate", float("nan")), 2),
        "seconds_warp_and_write": round(res.summary.get("seconds_warp_and_write", float("nan")), 2),
        **(_stages(model.seconds, steps, res.summary["seconds_warp_and_write"]) if variant == "ldm" else {}),
        **reference,
        "files_written": len(files), "written_mb": round(written_mb, 1),
        **mem.to_dict(), "cuda_peak_mb": cuda_peak_mb(device), "env": environment(device),
    }


def _stages(seconds: dict[str, float], steps: int, write_s: float) -> dict[str, Any]:
    """Stage times, seconds per network evaluation (9 phases in one batch), the cycle composed for 10 / 20 / 200 steps."""
    per_eval = seconds["sample"] / steps
    fixed = seconds["encode"] + seconds["decode"] + write_s
    return {"stages_s": seconds, "seconds_per_network_evaluation_batch9": round(per_eval, 2),
            "cycle_composed_s": {n: round(fixed + n * per_eval, 1) for n in (10, 20, 200)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", default="fixed", choices=("fixed", "ldm"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=0, help="ldm: DPM-Solver++ steps actually run (0: the default)")
    p.add_argument("--reference-ddim", type=int, default=0, metavar="N",
                   help="ldm: also sample DDIM with N steps (same model and noise) and report the field difference")
    p.add_argument("--reference-phases", default="10,50", help="ldm: phases of the DDIM reference (comma-separated)")
    p.add_argument("--formats", default="nifti,mha",
                   help="output formats (comma-separated; synthesize's default is nifti alone)")
    p.add_argument("--bundle", default="", help="ldm: a trained bundle instead of the untrained default-size one")
    p.add_argument("--dvf-coarse-levels", type=int, default=DVF_COARSE_LEVELS,
                   help="ldm: the untrained DVF decoder's coarse levels (0 = full resolution)")
    p.add_argument("--shape", default="50x256x256", help="grid z x y x x (a trained bundle's own grid)")
    p.add_argument("--precision", default="fp32", help="ldm: the networks' precision, fp32, bf16 or auto (bf16 also "
                   "samples --reference-phases in fp32 and reports the difference)")
    a = p.parse_args(argv)
    phases = tuple(int(k) for k in a.reference_phases.split(",") if k)
    shape = tuple(int(n) for n in a.shape.split("x"))
    formats = tuple(f for f in a.formats.split(",") if f)
    print(json.dumps(run(a.device, shape, quick=a.quick, variant=a.variant, formats=formats, steps=a.steps,
                         reference_ddim=a.reference_ddim, reference_phases=phases, bundle=a.bundle,
                         dvf_coarse_levels=a.dvf_coarse_levels, precision=a.precision), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
