"""Coronal, axial and sagittal GIFs of a POPI synthesis through its stand-in GTV, contour on every phase.

Run from the repository root after::

    python examples/popi_gtv_sphere.py            # writes out/popi_gtv.nii.gz
    respmotion synthesize <POPI dicom> --structures out/popi_gtv.nii.gz --out out/popi
    python examples/popi_gtv_gif.py out/popi/sample_00

Reads the default NIfTI outputs: ``phase_XX.nii.gz`` (native grid), ``dvf_XX.nii.gz`` (model grid,
brought to the native grid here) and ``structures/popi_gtv_XX.nii.gz``.
"""

import argparse

import numpy as np

from respmotion.core import DisplacementField, Geometry, Volume
from respmotion.core.ops import resample_field
from respmotion.io.volumes import load_field, load_volume
from respmotion.viz.cycle import render_cycle

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("sample", nargs="?", default="out/popi/sample_00", help="a synthesis sample folder")
parser.add_argument("--centre", default="43,240,200", help="GTV centre voxel z,y,x on the native grid")
args = parser.parse_args()

c = tuple(int(v) for v in args.centre.split(","))
sl = (slice(c[0] - 20, c[0] + 21), slice(c[1] - 60, c[1] + 61), slice(c[2] - 100, c[2] + 101))


def cropped_geometry(g: Geometry) -> Geometry:
    """The geometry of ``sl`` cut out of a volume on ``g``."""
    start = np.array([s.start for s in sl], float)
    shape = tuple(s.stop - s.start for s in sl)
    return Geometry(shape, g.spacing, tuple(g.index_to_world(start)), g.direction)


phases, fields, masks = [], [], []
for k in range(0, 100, 10):
    v = load_volume(f"{args.sample}/phase_{k:02d}.nii.gz")
    g = cropped_geometry(v.geometry)
    phases.append(Volume(np.ascontiguousarray(v.array[sl]), g))
    f = resample_field(load_field(f"{args.sample}/dvf_{k:02d}.nii.gz"), v.geometry.shape)
    fields.append(DisplacementField(np.ascontiguousarray(f.array[(slice(None),) + sl]), g))
    m = load_volume(f"{args.sample}/structures/popi_gtv_{k:02d}.nii.gz")
    masks.append(np.ascontiguousarray(m.array[sl]).astype(np.uint8))
out = render_cycle(f"{args.sample}/gifs_gtv", phases, fields, contours=[masks],
                   views=("axial", "coronal", "sagittal"), fps=2, difference=False)
print([str(p) for p in out])
