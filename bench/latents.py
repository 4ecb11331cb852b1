"""Latent encoding throughput: volumes/s of the default-size image autoencoder (CT) and DVF VAE (field).

What ``respmotion latents`` does per item (``Autoencoder.encode_latent``: normalise, encode, scale),
with untrained default-size networks (speed does not depend on the weights), at 50x256x256 unless
told otherwise.  Inputs: a phantom end-inhale CT and its exact end-exhale field, so the numbers
see realistic values (not that convolutions care).

    python -m bench.latents [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

SHAPE = (50, 256, 256)


QUICK_SLICES = 10  # --quick encodes a 10-slice slab (cost is linear in depth: no depth downsampling)


def run(device: str = "cpu", shape: tuple[int, int, int] = SHAPE, quick: bool = False,
        cache_dir: str | None = None) -> dict[str, Any]:
    """Seconds per volume and volumes/s of ``encode_latent`` for each autoencoder (batch 1).

    CPU: one timed run (a full volume takes minutes on 2 cores); CUDA: one warm-up and three
    timed runs.  ``quick``: a slab of 10 slices, reported per slab and extrapolated to the full
    depth (``extrapolated: true``).
    """
    import torch

    from bench.common import PeakRSS, cuda_peak_mb, environment, phantom_cycle, reset_cuda_peak, timed

    from respmotion.models.autoencoder import Autoencoder, default_net_config

    t0 = time.perf_counter()
    _, cts, dvfs = phantom_cycle(tuple(shape), cache_dir)
    ct, dvf = cts[0], dvfs[50]
    setup_s = time.perf_counter() - t0
    cuda = device.startswith("cuda")
    repeats, warmup = (3, 1) if cuda else (1, 0)
    depth = shape[0]
    if quick:
        z0 = (shape[0] - QUICK_SLICES) // 2
        ct, dvf = ct[z0:z0 + QUICK_SLICES], dvf[:, z0:z0 + QUICK_SLICES]
        depth = QUICK_SLICES
        repeats, warmup = (1, 1) if cuda else (1, 0)
    out: dict[str, Any] = {"shape_zyx": list(shape), "encoded_shape_zyx": [depth, *shape[1:]], "batch": 1,
                           "weights": "untrained (default architecture)", "setup_s": round(setup_s, 2),
                           "quick": quick, "extrapolated": depth != shape[0]}
    for kind, arr in (("image", ct[None]), ("dvf", dvf)):
        torch.manual_seed(0)
        model = Autoencoder(default_net_config(kind)).to(device).eval()
        x = torch.from_numpy(arr)[None].to(device)
        z = {}

        def step() -> None:
            z["z"] = model.encode_latent(x)

        reset_cuda_peak(device)
        with PeakRSS() as mem:
            t = timed(step, device, repeats=repeats, warmup=warmup)
        per_volume = t["seconds_min"] * shape[0] / depth
        out[kind] = {
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "input_shape": list(x.shape), "latent_shape": list(z["z"].shape),
            **t, "seconds_per_volume": round(per_volume, 3), "volumes_per_s": round(1.0 / per_volume, 5),
            **mem.to_dict(), "cuda_peak_mb": cuda_peak_mb(device),
        }
        del model, x, z
    out["env"] = environment(device)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(run(a.device, quick=a.quick), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
