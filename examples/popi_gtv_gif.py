# Run from the repository root after `respmotion synthesize <POPI dicom> --model out/demo/runs/diffusion --structures out/popi_gtv.nii.gz --out out/popi`.
"""Coronal + axial GIFs of the POPI synthesis through the stand-in GTV, contour on every phase."""
import numpy as np
from respmotion.core import Geometry, Volume, DisplacementField
from respmotion.io.volumes import load_volume, load_field
from respmotion.viz.cycle import render_cycle
d = "out/popi/sample_00"
ks = list(range(0, 100, 10))
c = (43, 240, 200)  # GTV centre voxel (z, y, x)
sl = (slice(c[0] - 20, c[0] + 21), slice(c[1] - 60, c[1] + 61), slice(c[2] - 100, c[2] + 101))
def crop(arr, g):
    start = [s.start for s in sl]
    geo = Geometry(arr[sl].shape if arr.ndim == 3 else arr[(slice(None),) + sl].shape[1:], g.spacing,
                   tuple(g.index_to_world(np.array(start, float))), g.direction)
    return geo
phases, fields, masks = [], [], []
for k in ks:
    v = load_volume(f"{d}/phase_{k:02d}.mha"); g = crop(v.array, v.geometry)
    phases.append(Volume(np.ascontiguousarray(v.array[sl]), g))
    f = load_field(f"{d}/dvf_{k:02d}.mha"); fields.append(DisplacementField(np.ascontiguousarray(f.array[(slice(None),) + sl]), g))
    m = load_volume(f"{d}/structures/popi_gtv_{k:02d}.nii.gz"); masks.append(np.ascontiguousarray(m.array[sl]).astype(np.uint8))
out = render_cycle("out/popi/gifs_gtv", phases, fields, contours=[masks], views=("axial", "coronal", "sagittal"), fps=2, difference=False)
print([str(p) for p in out])
