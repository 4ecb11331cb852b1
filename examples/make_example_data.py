"""Make the example input shipped in ``examples/data/`` (run from the repository root; deterministic
apart from DICOM UIDs and dates):

* ``examples/data/ct/phase_00/CT*.dcm``: end-inhale CT of phantom patient seed 7 at the demo's grid
  (16 x 64 x 64 voxels, 9.4 x 5.6 x 5.6 mm), a DICOM CT series written by ``respmotion.io.dicom_export``;
* ``examples/data/nodule_rtstruct.dcm``: an RTSTRUCT on that series with one ROI, ``GTV``, the
  phantom's first nodule (right lower lobe), written by ``respmotion.io.rtstruct.write_rtstruct``.

Use: ``respmotion synthesize examples/data/ct/phase_00 --model BUNDLE --structures
examples/data/nodule_rtstruct.dcm --out out/example`` (BUNDLE: e.g. ``out/demo/runs/diffusion``
after ``make demo``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from respmotion.core import Volume
from respmotion.data.phantom import make_patient
from respmotion.io.dicom_export import SeriesRef, write_dicom_4dct
from respmotion.io.rtstruct import write_rtstruct

SEED, SHAPE = 7, (16, 64, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="examples/data", help="output folder (default examples/data)")
    out = Path(ap.parse_args().out)
    ph = make_patient(SEED, SHAPE, noise_hu=10.0)
    g = ph.geometry
    ct = Volume(ph.phase(0)["image"], g, {"patient": "phantom_example", "units": "HU"})
    if (out / "ct").exists():
        shutil.rmtree(out / "ct")
    write_dicom_4dct({0: ct}, out / "ct", description="respmotion phantom example")
    centre, r = ph.anatomy.nodules[0]  # the first nodule: the GTV stand-in
    centre_lps, radius = centre[::-1], max(r, 10.0)  # at least 10 mm: visible at 5.6 mm voxels
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(g.index_to_world(idx.astype(float)) - centre_lps, axis=1).reshape(g.shape)
    gtv = (dist <= radius).astype(np.uint8)
    ref = SeriesRef.from_folder(out / "ct" / "phase_00")
    write_rtstruct({"GTV": gtv}, ref, out / "nodule_rtstruct.dcm", interpreted_types={"GTV": "GTV"})
    print(f"{out / 'ct' / 'phase_00'}: CT {g.shape}; {out / 'nodule_rtstruct.dcm'}: GTV {int(gtv.sum())} voxels")


if __name__ == "__main__":
    main()
