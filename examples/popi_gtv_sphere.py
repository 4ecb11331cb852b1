# Run from the repository root after `make demo`: writes out/popi_gtv.nii.gz (a stand-in GTV on the POPI CT).
"""Place a 10 mm sphere in the right lower lobe of the POPI CT (stand-in GTV), save as NIfTI on its grid."""
import numpy as np
from respmotion.data.importer import import_ct
from respmotion.io.landmarks import read_popi_csv
from respmotion.io.volumes import save_volume
from respmotion.core import Volume
ct = import_ct("/work/shared/data/popi-4dct-phase00/dicom")
g = ct.geometry
print(g.shape, g.spacing, g.origin)
lm = read_popi_csv("/work/shared/data/popi-4dct-phase00/landmarks/popi_landmarks_lps_mm.csv")[0]
# right lung = LPS x < 0 (patient right); lower lobe = most inferior landmarks there
right = lm[lm[:, 0] < -20]
c = right[np.argsort(right[:, 2])[2]]  # third most inferior right-lung landmark
idx = g.world_to_index(c); print("centre", c, "index", idx, "HU", ct.array[tuple(np.round(idx).astype(int))])
zz, yy, xx = np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij")
pts = g.index_to_world(np.stack([zz, yy, xx], -1).reshape(-1, 3)).reshape(*g.shape, 3)
mask = (np.linalg.norm(pts - c, axis=-1) <= 10.0).astype(np.uint8)
print("voxels", mask.sum(), "mean HU inside", ct.array[mask > 0].mean())
save_volume(Volume(mask, g), "out/popi_gtv.nii.gz")
