"""GIF rendering: seconds to render the breathing-cycle GIFs of a 50x256x256 cycle.

:func:`respmotion.viz.cycle.render_cycle` on a phantom's 10 phases and exact fields: the three
motion GIFs (axial, coronal, sagittal; one slice each, arrows), timed alone, and the default
output (motion + difference GIFs) with the heatmap style.

    python -m bench.render [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPE = (50, 256, 256)


def run(device: str = "cpu", shape: tuple[int, int, int] = SHAPE, quick: bool = False,
        cache_dir: str | None = None) -> dict[str, Any]:
    """Rendering is numpy/matplotlib on the CPU whatever ``device`` says (recorded as such)."""
    from bench.common import PeakRSS, environment, phantom_cycle

    from respmotion.core.types import DisplacementField, Volume
    from respmotion.io.layout import PHASES
    from respmotion.viz.cycle import render_cycle

    t0 = time.perf_counter()
    geom, cts, dvfs = phantom_cycle(tuple(shape), cache_dir)
    phases = [Volume(cts[k], geom) for k in PHASES]
    fields = [DisplacementField(dvfs[k], geom) for k in PHASES]
    setup_s = time.perf_counter() - t0
    cases = [("motion_arrows", {"style": "arrows", "difference": False})]
    if not quick:
        cases.append(("motion_and_diff_heatmap", {"style": "heatmap", "difference": True}))
    out: dict[str, Any] = {"shape_zyx": list(shape), "phases": len(phases), "views": 3, "slices_per_view": 1,
                           "setup_s": round(setup_s, 2), "quick": quick, "computed_on": "cpu"}
    with tempfile.TemporaryDirectory(prefix="respmotion-bench-render-") as tmp:
        for name, settings in cases:
            with PeakRSS() as mem:
                t1 = time.perf_counter()
                files = render_cycle(Path(tmp) / name, phases, fields, **settings)
                seconds = time.perf_counter() - t1
            gifs = [f for f in files if str(f).endswith(".gif")]
            out[name] = {"seconds": round(seconds, 2), "gifs": len(gifs),
                         "seconds_per_gif": round(seconds / max(1, len(gifs)), 3), **settings, **mem.to_dict()}
    out["env"] = environment("cpu")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(run(quick=a.quick), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
