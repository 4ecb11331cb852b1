"""``python -m bench``: run every benchmark and print one JSON document.

    python -m bench [--device cpu|cuda|auto] [--only NAME,...] [--quick] [--budget SECONDS] [--out FILE]

Benchmarks (each in its own process, see :mod:`bench.common`; each record carries the device, torch
threads and version, and the load average before/after):

====================  ==========================================  ==========================
name                  what                                        script
====================  ==========================================  ==========================
registration          time/pair, memory, accuracy per method      bench/registration.py
train_step            samples/s, memory: AEs and diffusion UNet   bench/train_step.py
latents               volumes/s encoding a CT and a DVF           bench/latents.py
sampling              s per cycle per sampler, their difference   bench/sampling.py
synthesis             end to end, FixedMotion: seconds, memory    bench/synthesis.py
synthesis_ldm         end to end, untrained default-size LDM      bench/synthesis.py
synthesis_native      512x512x141 CT, 10 phases, NIfTI+DICOM+RT   bench/synthesis_native.py
render                seconds for the breathing-cycle GIFs        bench/render.py
seed                  research checkpoints: DDIM-200 vs fast, mm  bench/seed.py
====================  ==========================================  ==========================

``synthesis_ldm`` and ``seed`` run by default only on CUDA (on 2 CPU cores they take minutes); name them
with ``--only`` to run them anyway.  Each benchmark may run until what is left of ``--budget``, less
the typical CPU time of the benchmarks after it (``expect_s``), is spent (at most ``cap_s``).  One
whose script is missing, fails, or runs past its limit is recorded as ``{"error": "..."}``; the
others still run, and the exit code is 1 when any benchmark has an error.  The default budget
keeps ``make bench`` under 10 minutes.  ``sampling`` also compares the samplers on the model that
``make demo`` trained (``out/demo``) when it is there: run ``make demo`` first.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from .common import ROOT, device_name, emit, environment, loadavg, run_isolated


@dataclass
class Bench:
    name: str
    module: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    cap_s: float = 300.0  # longest this benchmark may take (within the overall budget)
    expect_s: float = 60.0  # typical time on 2 CPU cores: reserved for it while earlier benchmarks run
    shared_inputs: bool = False  # takes cache_dir (the phantom cycle shared between processes)
    default_on_cpu: bool = True


FULL_SHAPE = [50, 256, 256]

BENCHES: list[Bench] = [
    # ours only, the 3 selected pairs in one batch (a 19-pair study batch: 9.9 s a pair, but 190 s);
    # the three-method table (deepali, elastix) is `python -m bench.registration` (17 min on CPU)
    Bench("registration", "bench.registration", {"shape": FULL_SHAPE, "methods": ["ours"], "batch": "pairs"},
          cap_s=240, expect_s=40),
    # full shape on CUDA; the autoencoders at 50x128x128 on CPU (full-shape CPU steps: python -m bench.train_step)
    Bench("train_step", "bench.train_step", {"quick_on_cpu": True}, cap_s=240, expect_s=170),
    Bench("latents", "bench.latents", {"shape": FULL_SHAPE}, cap_s=240, expect_s=85, shared_inputs=True),
    Bench("sampling", "bench.sampling", {"demo_dir": str(ROOT / "out" / "demo")}, cap_s=240, expect_s=115),
    Bench("synthesis", "bench.synthesis", {"shape": FULL_SHAPE, "variant": "fixed"}, cap_s=240, expect_s=60,
          shared_inputs=True),
    Bench("synthesis_ldm", "bench.synthesis", {"shape": FULL_SHAPE, "variant": "ldm"}, cap_s=600, expect_s=600,
          shared_inputs=True, default_on_cpu=False),
    # native-size warping and writing (POPI 512x512x141 or a phantom of that size): ~2 min on 2 cores, so by name
    Bench("synthesis_native", "bench.synthesis_native", {"motion": "fixed"}, cap_s=600, expect_s=150,
          default_on_cpu=False),
    Bench("render", "bench.render", {"shape": FULL_SHAPE}, cap_s=150, expect_s=20, shared_inputs=True),
    # research-code (seed) checkpoints of the published size; on CPU composed timings, no field difference
    Bench("seed", "bench.seed", {}, cap_s=600, expect_s=240, shared_inputs=True, default_on_cpu=False),
]
NAMES = [b.name for b in BENCHES]
MIN_SLICE_S = 10.0  # a benchmark given less than this is not started


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(NAMES)}")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and smaller work where a script offers it")
    p.add_argument("--budget", type=float, default=None,
                   help="overall seconds (default 570, 360 with --quick); see the limits above")
    p.add_argument("--out", help="also write the JSON document to this file")
    return p.parse_args(argv)


def select(only: str | None, device: str) -> list[Bench]:
    if not only:
        return [b for b in BENCHES if b.default_on_cpu or device.startswith("cuda")]
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r} (known: {', '.join(NAMES)})")
    return [b for b in BENCHES if b.name in wanted]


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    device = device_name(args.device)
    benches = select(args.only, device)
    budget = args.budget if args.budget is not None else (360.0 if args.quick else 570.0)
    t_start = time.perf_counter()
    doc: dict[str, Any] = {
        "format": "respmotion.bench/1",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python -m bench", *args.argv]),
        "device": device, "quick": bool(args.quick), "budget_s": budget,
        "env": environment(device),
        "not_run": {b.name: "runs on CUDA only by default (many minutes on CPU); select it with --only"
                    for b in BENCHES if b not in benches and not args.only and not b.default_on_cpu},
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="respmotion-bench-cache-") as cache:
        if any(b.shared_inputs for b in benches):  # the phantom cycle the input-sharing benchmarks read
            print(f"[bench] building the shared phantom inputs ({FULL_SHAPE})", file=sys.stderr, flush=True)
            doc["inputs"] = run_isolated("bench.common", "build_cache",
                                         {"device": device, "shape": FULL_SHAPE, "cache_dir": cache}, timeout=budget / 4)
        runnable = [b for b in benches if importlib.util.find_spec(b.module) is not None]
        for i, b in enumerate(benches):
            remaining = budget - (time.perf_counter() - t_start)
            # what is left, less the typical time of every later benchmark (so a slow one cannot starve them)
            reserve = sum(c.expect_s for c in runnable if benches.index(c) > i)
            timeout = min(b.cap_s, remaining - reserve)
            print(f"[bench] {b.name} (limit {max(0, timeout):.0f} s, load {loadavg()})", file=sys.stderr, flush=True)
            if importlib.util.find_spec(b.module) is None:
                rec: dict[str, Any] = {"error": f"{b.module.replace('.', '/')}.py not found (benchmark script not written yet)"}
            elif timeout < MIN_SLICE_S:
                rec = {"error": f"not started: the overall budget of {budget:.0f} s was used up by earlier benchmarks"}
            else:
                kwargs = {"device": device, "quick": bool(args.quick), **b.kwargs}
                if b.shared_inputs:
                    kwargs["cache_dir"] = cache
                rec = run_isolated(b.module, "run", kwargs, timeout=timeout)
            doc["results"][b.name] = rec
            status = f"error: {rec['error']}" if "error" in rec else f"ok in {rec.get('wall_s', '?')} s"
            print(f"[bench] {b.name}: {status}", file=sys.stderr, flush=True)
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    doc["loadavg_end"] = loadavg()
    doc["errors"] = sorted(n for n, r in doc["results"].items() if "error" in r)
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        doc = run_all(args)
    except ValueError as exc:  # e.g. --device cuda without CUDA
        print(f"python -m bench: error: {exc}", file=sys.stderr)
        return 2
    emit(doc, args.out)
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
