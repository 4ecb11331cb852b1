# Run from the repository root: python examples/popi_gtv_sphere.py [POPI_FOLDER]; writes out/popi_gtv.nii.gz.
"""Place a 10 mm sphere in the right lower lobe of the POPI CT (stand-in GTV), save as NIfTI on its grid.

POPI_FOLDER holds ``dicom/`` and ``landmarks/popi_landmarks_lps_mm.csv`` (default: ``popi-4dct-phase00``
in the shared data folder beside the repository, or $RESPMOTION_SHARED_DATA)."""
import os
import sys
from pathlib import Path

import numpy as np
from respmotion.data.importer import import_ct
from respmotion.io.landmarks import read_popi_csv
from respmotion.io.volumes import save_volume
from respmotion.core import Volume
shared = Path(os.environ.get("RESPMOTION_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
popi = Path(sys.argv[1]) if len(sys.argv) > 1 else shared / "popi-4dct-phase00"
ct = import_ct(popi / "dicom")
g = ct.geometry
print(g.shape, g.spacing, g.origin)
lm = read_popi_csv(popi / "landmarks" / "popi_landmarks_lps_mm.csv")[0]
# right lung = LPS x < 0 (patient right); lower lobe = most inferior landmarks there
right = lm[lm[:, 0] < -20]
c = right[np.argsort(right[:, 2])[2]]  # third most inferior right-lung landmark
idx = g.world_to_index(c); print("centre", c, "index", idx, "HU", ct.array[tuple(np.round(idx).astype(int))])
zz, yy, xx = np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij")
pts = g.index_to_world(np.stack([zz, yy, xx], -1).reshape(-1, 3)).reshape(*g.shape, 3)
mask = (np.linalg.norm(pts - c, axis=-1) <= 10.0).astype(np.uint8)
print("voxels", mask.sum(), "mean HU inside", ct.array[mask > 0].mean())
save_volume(Volume(mask, g), "out/popi_gtv.nii.gz")
