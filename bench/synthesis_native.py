"""Synthesis at a clinical CT's native size: 512x512x141, 10 phases, NIfTI + DICOM + RTSTRUCT.

Input: POPI phase 00 (a real 512x512x141 DICOM series, ``../shared/data/popi-4dct-phase00/dicom``) when
present, used as the DICOM template (the phases join its study); else a phantom CT of that size (the
50x256x256 phantom resampled).  Motion (``motion``):

* ``fixed`` (default): :class:`~respmotion.synthesis.pipeline.FixedMotion` holding a smooth analytic
  breathing field per phase (up to 12 mm superior-inferior, 3 mm anterior-posterior) on the 50x256x256
  model grid -- what is timed is the warping and writing that every synthesis pays after the motion model;
  the network's share is ``bench.sampling`` / ``synthesis_ldm``;
* ``demo``: the bundle ``make demo`` trained (``out/demo/runs/diffusion``), at its own grid.

A spherical GTV (radius 15 mm) on the input goes through every phase: one RTSTRUCT per phase holds it and
its ITV.  Recorded: wall seconds of :func:`respmotion.synthesis.pipeline.synthesize`, peak resident
memory (``rss_peak_mb``; ``python -m bench`` adds the process's ``peak_rss_mb``), bytes and files
written, torch threads (default: the CPUs this process may run on, ``os.sched_getaffinity``).
Targets (2 cores): <= 180 s wall and <= 4 GB peak RSS.

``--hog N`` runs N busy-looping processes beside the synthesis (load ~N on top of ours), to measure
the slowdown on a busy machine against a run without (target <= 3x at load 4).  OpenMP's
``OMP_WAIT_POLICY`` must be set before torch starts, so compare it from the shell::

    python -m bench.synthesis_native > idle.json
    python -m bench.synthesis_native --hog 4 > hog.json
    OMP_WAIT_POLICY=PASSIVE python -m bench.synthesis_native --hog 4 > hog_passive.json

    python -m bench.synthesis_native [--motion fixed|demo] [--threads N] [--hog N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT

POPI = ROOT.parent / "shared" / "data" / "popi-4dct-phase00" / "dicom"
DEMO_BUNDLE = ROOT / "out" / "demo" / "runs" / "diffusion"
NATIVE = (141, 512, 512)
MODEL = (50, 256, 256)
FORMATS = ("nifti", "dicom")


def native_ct():
    """(CT volume on its native grid, DICOM template folder or None, what it is)."""
    if POPI.is_dir():
        from respmotion.io.dicom import read_dicom_series

        return read_dicom_series(POPI), str(POPI), f"POPI phase 00 ({POPI})"
    from respmotion.core.geometry import Geometry
    from respmotion.core.ops import resample_array
    from respmotion.core.types import Volume
    from respmotion.data.phantom import Phantom

    small = Phantom(0, MODEL).phase(0)["image"]
    geom = Geometry(NATIVE, (2.0, 0.9765625, 0.9765625), (-250.0, -250.0, -140.0))
    return Volume(resample_array(small, NATIVE), geom), None, "phantom seed 0 (50x256x256 resampled to 141x512x512)"


def analytic_motion(ct):
    """FixedMotion: a smooth breathing-like pull field per phase on the CT's model grid (mm, (3, z, y, x))."""
    import numpy as np

    from respmotion.core.types import DisplacementField
    from respmotion.io.layout import PHASES
    from respmotion.synthesis.pipeline import FixedMotion

    g = ct.geometry.resized(MODEL)
    z, y, x = np.meshgrid(*[np.linspace(0.0, 1.0, n, dtype=np.float32) for n in MODEL], indexing="ij")
    lungs = np.sin(np.pi * y) * np.sin(np.pi * x)  # largest in the middle of the slice, zero at its edges
    base = np.stack([12.0 * (1.0 - z) * lungs, 3.0 * lungs * np.sin(np.pi * z), np.zeros_like(z)]).astype(np.float32)
    amp = {k: float(np.sin(np.pi * k / 100.0) ** 2) for k in PHASES}  # 0 at 00 %, 1 at 50 %
    return FixedMotion({k: DisplacementField(amp[k] * base, g) for k in PHASES}, MODEL)


def gtv(ct, radius_mm: float = 15.0):
    """A sphere (uint8 mask) centred right of the middle of the CT (where a right-lung tumour would be)."""
    import numpy as np

    g = ct.geometry
    centre = np.array([g.shape[0] / 2.0, g.shape[1] / 2.0, g.shape[2] * 0.3])
    zz, yy, xx = np.ogrid[:g.shape[0], :g.shape[1], :g.shape[2]]
    d2 = (((zz - centre[0]) * g.spacing[0]) ** 2 + ((yy - centre[1]) * g.spacing[1]) ** 2
          + ((xx - centre[2]) * g.spacing[2]) ** 2)
    return (d2 <= radius_mm ** 2).astype(np.uint8)


@contextlib.contextmanager
def cpu_hogs(n: int):
    """``n`` busy-looping child processes while the block runs (ended by their pids afterwards)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def run(device: str = "cpu", motion: str = "fixed", threads: int = 0, keep: str = "", hog: int = 0,
        **_: Any) -> dict[str, Any]:
    import torch

    from bench.common import PeakRSS, environment, loadavg

    from respmotion.runtime import available_cpus, use_threads
    from respmotion.synthesis.pipeline import SynthesisOptions, synthesize

    use_threads(threads)
    t0 = time.perf_counter()
    ct, template, what = native_ct()
    if motion == "fixed":
        model = analytic_motion(ct)
        motion_what = "FixedMotion: analytic smooth breathing fields on the 50x256x256 model grid (no network)"
    elif motion == "demo":
        from respmotion.synthesis.ldm import load_bundle

        if not DEMO_BUNDLE.exists():
            raise FileNotFoundError(f"{DEMO_BUNDLE}: no demo model (run `make demo` first)")
        model = load_bundle(DEMO_BUNDLE, device=device)
        motion_what = f"demo bundle {DEMO_BUNDLE} at {list(model.shape)}, sampler {model.sampler.name}"
    else:
        raise ValueError(f"motion must be fixed or demo, got {motion!r}")
    structures = {"GTV": gtv(ct)}
    setup_s = time.perf_counter() - t0
    opts = SynthesisOptions(samples=1, seed=0, formats=FORMATS)
    with tempfile.TemporaryDirectory(prefix="respmotion-bench-native-", dir=keep or None) as tmp:
        out = Path(tmp) / "synthesis"
        with cpu_hogs(hog), PeakRSS() as mem:
            load_before = loadavg()
            t1 = time.perf_counter()
            res = synthesize(ct, model, out, opts, structures=structures, template=template)
            seconds = time.perf_counter() - t1
            load_after = loadavg()
        files = [p for p in out.rglob("*") if p.is_file()]
        written = sum(p.stat().st_size for p in files)
        rec = res.summary["samples"][0]
    return {
        "input": what, "shape_zyx": list(ct.geometry.shape), "motion": motion_what, "phases": 10,
        "formats": list(FORMATS), "structures": ["GTV (+ ITV in every RTSTRUCT)"],
        "dicom_study_joined": bool(template) and rec["dicom"]["study_uid"] == ct.meta.get("study_uid"),
        "setup_s": round(setup_s, 2), "seconds": round(seconds, 2),
        "seconds_generate": round(res.summary["seconds_generate"], 2),
        "seconds_warp_and_write": round(res.summary["seconds_warp_and_write"], 2),
        "files_written": len(files), "bytes_written": written, "written_mb": round(written / 2**20, 1),
        "cpus_available": available_cpus(), "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "hog_processes": hog,
        "loadavg_during": [load_before, load_after],
        **mem.to_dict(), "targets": {"seconds": 180, "rss_peak_mb": 4096},
        "env": environment(device),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--motion", default="fixed", choices=("fixed", "demo"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: the CPUs available)")
    p.add_argument("--hog", type=int, default=0, help="busy-looping processes to run beside it")
    p.add_argument("--keep", default="", help="folder for the temporary outputs (default: the system's)")
    a = p.parse_args(argv)
    print(json.dumps(run(a.device, a.motion, a.threads, a.keep, a.hog), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
