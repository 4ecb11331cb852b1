"""Research-code (seed) models at the default size: DDIM-200 vs the fast sampler.

A seed-format model of the published size (image autoencoder base 96, DVF VAE with 9 latent
channels, UNet base 64 on 12 -> 9 x 50x32x32 latents; random weights, or ``--weights DIR`` with
the published folders) is written in the published layout, loaded by
:func:`respmotion.models.seed.load_seed_checkpoints` and run by
:class:`respmotion.synthesis.seed.SeedMotion` on a 50x256x256 phantom CT (phase 00).  One cycle
is 9 autoregressive transitions, each = encode the current phase image + ``steps`` UNet
evaluations + decode the DVF + convert/compose/warp.

* ``samplers``: seconds per cycle for DDIM with delta_t 5 (200 steps, the research default) and
  DPM-Solver++(2M) 20 steps.  On CUDA each is a full ``generate`` run.  On CPU a DDIM-200 cycle
  takes hours, so the figures are composed from measured pieces (``"method": "composed"``):
  ``9 x (encode + steps x UNet evaluation + sampler arithmetic + decode + post-processing)``, each
  piece timed once at batch 1 (UNet: best of 2 after a warm-up).
* ``field_difference``: the step field 00 -> 10 % (mm, inside the body: CT above the body threshold, -500 HU) that the two
  samplers give from the same initial noise; on CUDA also the whole composed cycle.  With random
  weights this is solver discrepancy on an untrained network (latents far from any motion), not a
  quality figure; give ``--weights`` for real ones.  On CPU it costs ~220 UNet evaluations (about
  15 minutes on 2 cores), so it runs only with ``diff=True`` (``--diff``).

    python -m bench.seed [--device cpu|cuda] [--weights DIR] [--diff]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHAPE = (50, 256, 256)
SAMPLERS = {"ddim_200": {"sampler": "ddim", "delta_t": 5}, "dpmpp2m_20": {"sampler": "dpm", "steps": 20}}


def write_default_seed(root: Path) -> Path:
    """Default-size seed-format models with random weights in the published layout."""
    from respmotion.models.seed import (AutoencoderArgs, SeedAutoencoder, SeedUNet, SeedVariationalAutoencoder,
                                        UNetArgs, randomize_, write_seed_checkpoints)

    img = AutoencoderArgs(in_channels=1, base_channels=96, latent_channels=3, out_channels=1, layer_type="double_res",
                          keep_z=[True, True, True], channel_multipliers=[1, 2, 4], norm="group", dvf_scale_factor=10.0)
    dvf = AutoencoderArgs(**{**img.__dict__, "variational": True, "in_channels": 3, "out_channels": 3,
                             "latent_channels": 9})
    unet = UNetArgs(image_width=32, image_depth=50, in_channels=12, out_channels=9, base_channels=64, n_layers=3,
                    layer_type="double_res", keep_z=[False, True, True], noise_schedule="linear", norm="group",
                    dvf_scale_factor=10.0)
    return write_seed_checkpoints(root, randomize_(SeedAutoencoder(img), 0), img,
                                  randomize_(SeedVariationalAutoencoder(dvf), 1), dvf,
                                  randomize_(SeedUNet(unet), 2), unet, {"T": 1000})


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _seconds(fn, device: str, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _difference(a: np.ndarray, b: np.ndarray, body: np.ndarray) -> dict[str, float]:
    """|a - b| (mm) inside ``body`` and the mean magnitude of each, fields ``(3, z, y, x)``."""
    d = np.sqrt(((a - b) ** 2).sum(0))[body]
    mag = lambda f: float(np.sqrt((f**2).sum(0))[body].mean())  # noqa: E731
    return {"mean_mm": round(float(d.mean()), 4), "p95_mm": round(float(np.percentile(d, 95)), 4),
            "max_mm": round(float(d.max()), 4), "mean_magnitude_ddim_mm": round(mag(a), 4),
            "mean_magnitude_fast_mm": round(mag(b), 4)}


@torch.no_grad()
def run(device: str = "cpu", quick: bool = False, weights: str | None = None, diff: bool | None = None,
        cache_dir: str | None = None, shape: tuple[int, int, int] = SHAPE) -> dict[str, Any]:
    """The JSON record (module docstring); ``shape`` other than the default is for smoke tests,
    ``quick`` is accepted for ``python -m bench``'s common interface."""
    from bench.common import environment, phantom_cycle
    from respmotion.anatomy import BODY_THRESHOLD_HU
    from respmotion.core import warp as W
    from respmotion.core.types import Volume
    from respmotion.diffusion.schedulers import run_sampler
    from respmotion.synthesis.seed import airlab_to_pull_mm, load_seed_motion, model_input, normalize_hu

    cuda = device.startswith("cuda")
    diff = cuda if diff is None else bool(diff)
    geom, cts, _ = phantom_cycle(tuple(shape), cache_dir)
    ct = Volume(cts[0], geom)
    with tempfile.TemporaryDirectory(prefix="respmotion-seed-bench-") as tmp:
        root = Path(weights) if weights else write_default_seed(Path(tmp))
        motions = {k: load_seed_motion(root, device=device, **v) for k, v in SAMPLERS.items()}
    ref = motions["ddim_200"]
    m = ref.models
    spacing = tuple(float(s) for s in geom.resized(ref.shape).spacing)
    out: dict[str, Any] = {
        "weights": str(weights) if weights else "random (no published weights on this machine)",
        "model_shape": list(ref.shape), "ct_shape": list(shape), "device": device,
        "torch_threads": torch.get_num_threads(), "transitions_per_cycle": 9,
        "params_M": {k: round(sum(p.numel() for p in net.parameters()) / 1e6, 2) for k, net in
                     (("image_ae", m.image_autoencoder), ("dvf_vae", m.dvf_autoencoder), ("unet", m.unet))},
        "method": "measured" if cuda else "composed", "samplers": {}, "env": environment(device)}
    img = model_input(ct, ref.shape).to(device)
    body = (img[0, 0] > float(normalize_hu(np.float32(BODY_THRESHOLD_HU)))).cpu().numpy()  # on the model grid
    gen = torch.Generator(device=device).manual_seed(0)
    z_img = m.image_encoder(img)
    x_T = torch.randn((1, m.unet_args.out_channels, *z_img.shape[2:]), generator=gen, device=device)
    if cuda:
        ref.generate(ct, 1, 0)  # warm-up
        cycles = {}
        for k, motion in motions.items():
            t0 = time.perf_counter()
            cycles[k] = motion.generate(ct, 1, 0)[0]
            _sync(device)
            out["samplers"][k] = {"steps": motion.sampler.num_steps, "s_per_cycle": round(time.perf_counter() - t0, 2)}
        out["cycle_difference_phase_90"] = _difference(cycles["ddim_200"][90].array, cycles["dpmpp2m_20"][90].array,
                                                       body)
    else:
        phase = torch.zeros(1, dtype=torch.long, device=device)
        t = torch.full((1,), 0.5, device=device)
        unet_in = torch.cat((z_img, x_T), 1)
        m.unet(unet_in, t, phase)  # warm-up
        u0 = torch.zeros((1, 3, *ref.shape), device=device)
        pieces = {"encode_s": _seconds(lambda: m.image_encoder(img), device),
                  "unet_eval_s": _seconds(lambda: m.unet(unet_in, t, phase), device, repeats=2),
                  "decode_s": _seconds(lambda: m.dvf_decoder(x_T), device),
                  "post_s": _seconds(lambda: W.warp(img, W.compose(u0, airlab_to_pull_mm(u0, spacing), spacing),
                                                    spacing), device)}
        out["pieces"] = {k: round(v, 3) for k, v in pieces.items()}
        for k, motion in motions.items():
            arith = _seconds(lambda: run_sampler(motion.sampler, lambda x, tt: torch.zeros_like(x), x_T,
                                                 lambda: torch.randn_like(x_T)), device)
            n = motion.sampler.num_steps
            per = pieces["encode_s"] + n * pieces["unet_eval_s"] + arith + pieces["decode_s"] + pieces["post_s"]
            out["samplers"][k] = {"steps": n, "s_per_transition": round(per, 2), "s_per_cycle": round(9 * per, 1),
                                  "sampler_arithmetic_s": round(arith, 4)}
    out["speedup_fast_vs_ddim_200"] = round(out["samplers"]["ddim_200"]["s_per_cycle"]
                                            / out["samplers"]["dpmpp2m_20"]["s_per_cycle"], 2)
    if diff:
        steps = {k: airlab_to_pull_mm(motion.transition(img, 0, x_T, gen), spacing)[0].cpu().numpy()
                 for k, motion in motions.items()}
        out["field_difference_step_00_10"] = _difference(steps["ddim_200"], steps["dpmpp2m_20"], body)
    else:
        out["field_difference_step_00_10"] = "not measured (CPU: ~220 UNet evaluations; run with --diff)"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--weights", help="folder with the published seed checkpoints (default: random weights)")
    ap.add_argument("--diff", action="store_true", help="also measure the field difference on CPU (~15 min)")
    a = ap.parse_args()
    print(json.dumps(run(a.device, weights=a.weights, diff=a.diff or None), indent=2))


if __name__ == "__main__":
    main()
