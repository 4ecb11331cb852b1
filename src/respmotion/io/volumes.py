"""Read and write volumes and displacement fields.

Formats (chosen by file name):

* ``.npy`` + ``.json`` sidecar: our training layout.  The sidecar holds the geometry
  (:meth:`Geometry.to_dict`) and free metadata.  Fields are stored ``(3, z, y, x)`` mm.
* ``.nii`` / ``.nii.gz``: scalar volumes through nibabel (RAS affine derived from our LPS
  geometry); displacement fields through SimpleITK as ITK vector images.
* ``.mha`` / ``.mhd`` / ``.nrrd``: SimpleITK.  Fields are written as ITK displacement fields:
  vector components in LPS world mm ``(x, y, z)``, which is what
  ``sitk.DisplacementFieldTransform`` and 3D Slicer expect.  ITK's transforms map points of the
  fixed (output) grid to the moving image, i.e. the same pull convention as ours.
* a folder: a DICOM series (see :mod:`respmotion.io.dicom`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.geometry import Geometry
from ..core.types import DisplacementField, Volume
from .atomic import atomic_path, read_json, read_npy, write_json, write_npy

SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")


def _kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(SITK_SUFFIXES):
        return "sitk"
    raise ValueError(f"{path}: unknown volume format (use .npy, .nii[.gz], .mha, .mhd, .nrrd or a DICOM folder)")


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


# ---------------------------------------------------------------- SimpleITK conversion
def to_sitk(array: np.ndarray, geometry: Geometry, vector: bool = False):
    import SimpleITK as sitk

    if vector:
        world = geometry.axes_to_world(array, axis=0)  # (3, z, y, x) LPS x,y,z
        img = sitk.GetImageFromArray(np.moveaxis(world, 0, -1).astype(np.float32), isVector=True)  # half the size of float64; ITK transforms cast
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(float(s) for s in geometry.spacing_xyz))
    img.SetOrigin(tuple(float(o) for o in geometry.origin))
    img.SetDirection(tuple(float(d) for d in geometry.direction))
    return img


def geometry_from_sitk(img) -> Geometry:
    return Geometry.from_itk(img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def from_sitk(img, vector: bool = False) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    geom = geometry_from_sitk(img)
    arr = sitk.GetArrayFromImage(img)
    if vector:
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected a 3-component vector image, got array shape {arr.shape}")
        arr = geom.world_to_axes(np.moveaxis(arr, -1, 0), axis=0).astype(np.float32)
    return arr, geom


def _read_sitk(path: Path):
    """SimpleITK image of ``path``; an unreadable file raises ``ValueError`` naming it."""
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1]})") from exc


# ---------------------------------------------------------------- NIfTI (scalar) via nibabel
def nifti_affine(geometry: Geometry) -> np.ndarray:
    """The NIfTI affine (ITK index -> RAS mm) of a NIfTI file written for ``geometry``; its array is the volume's
    ``(z, y, x)`` array transposed to ``(x, y, z)``."""
    return geometry.ras_affine()


def check_finite(array: np.ndarray, where: str | os.PathLike) -> np.ndarray:
    """Raise a one-line error naming ``where`` if a float array holds NaN or infinite values."""
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise ValueError(f"{where}: {int(bad.sum())} voxels are NaN or infinite")
    return array


def _check_nifti_spacing(path: Path, img) -> None:
    """Refuse a NIfTI file whose voxel size along an axis is 0 or not finite: in the stored ``pixdim``
    (nibabel silently reads a 0 as 1 mm) when no sform gives the geometry, or in the affine in use."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as fh:
        raw = img.header_class.from_fileobj(fh, check=False)
    sizes = list(np.linalg.norm(np.asarray(img.affine, dtype=np.float64)[:3, :3], axis=0))
    if int(raw["sform_code"]) == 0:
        sizes = [min(a, float(z)) for a, z in zip(sizes, raw["pixdim"][1:4])]
    bad = [(axis, z) for axis, z in zip("xyz", sizes) if not 0 < z < np.inf]
    if bad:
        raise ValueError(f"{path}: voxel size (pixdim) along {bad[0][0]} is {bad[0][1]:g} mm; the file does not "
                         f"say how far apart its voxels are")


# ---------------------------------------------------------------- volumes
def save_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume`` atomically; format from the file name (see module docstring)."""
    path = Path(path)
    kind = _kind(path) if not path.is_dir() else "dicom"
    if kind == "npy":
        write_npy(path, volume.array)
        write_json(sidecar(path), {"geometry": volume.geometry.to_dict(), "meta": volume.meta})
    elif kind == "nifti":
        import nibabel as nib

        # (x, y, z) view of the C-ordered (z, y, x) array: nibabel writes Fortran order, so no copy is made
        img = nib.Nifti1Image(volume.array.transpose(2, 1, 0), nifti_affine(volume.geometry))
        img.header.set_xyzt_units("mm")
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
    elif kind == "sitk":
        import SimpleITK as sitk

        with atomic_path(path) as tmp:
            sitk.WriteImage(to_sitk(volume.array, volume.geometry), str(tmp), True)
    else:
        raise ValueError(f"{path}: writing DICOM goes through respmotion.io.dicom_export")
    return path


def load_volume(path: str | os.PathLike) -> Volume:
    """Read a volume from ``.npy``(+json), NIfTI, MHA/NRRD or a DICOM folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = _kind(path)
    if kind == "npy":
        arr = read_npy(path)
        side = sidecar(path)
        if not side.exists():
            raise ValueError(f"{path}: missing JSON sidecar {side.name} with the geometry")
        info = read_json(side)
        if "geometry" not in info:
            raise ValueError(f"{side}: no 'geometry' entry")
        if arr.ndim != 3:
            raise ValueError(f"{path}: expected a 3D (z, y, x) array, got shape {arr.shape}")
        return Volume(check_finite(arr, path), Geometry.from_dict(info["geometry"]), info.get("meta", {}))
    if kind == "nifti":
        import nibabel as nib

        try:
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
        except Exception as exc:  # nibabel raises many types; report the file and re-raise typed
            raise ValueError(f"{path}: not a readable NIfTI file ({exc})") from exc
        if data.ndim != 3:
            raise ValueError(f"{path}: expected a 3D NIfTI volume, got shape {data.shape}")
        _check_nifti_spacing(path, img)
        arr = check_finite(np.ascontiguousarray(data.transpose(2, 1, 0)), path)
        return Volume(arr, Geometry.from_affine(img.affine, arr.shape, ras=True), {"source": str(path)})
    if kind == "sitk":
        img = _read_sitk(path)
        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{path}: expected a 3D scalar image, got {img.GetDimension()}D with {img.GetNumberOfComponentsPerPixel()} components")
        arr, geom = from_sitk(img)
        return Volume(check_finite(arr, path), geom, {"source": str(path)})
    from .dicom import read_dicom_series

    return read_dicom_series(path)


# ---------------------------------------------------------------- displacement fields
def save_field(field: DisplacementField, path: str | os.PathLike) -> Path:
    """Write a displacement field; NIfTI/MHA/NRRD as ITK displacement fields in LPS mm."""
    path = Path(path)
    kind = _kind(path)
    if kind == "npy":
        write_npy(path, field.array.astype(np.float32))
        write_json(sidecar(path), {"geometry": field.geometry.to_dict(), "meta": field.meta,
                                   "convention": "pull; (3,z,y,x) mm along array axes"})
    elif kind in ("nifti", "sitk"):
        import SimpleITK as sitk

        with atomic_path(path) as tmp:
            sitk.WriteImage(to_sitk(field.array, field.geometry, vector=True), str(tmp), True)
    else:
        raise ValueError(f"{path}: cannot write a displacement field there")
    return path


def load_field(path: str | os.PathLike) -> DisplacementField:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    kind = _kind(path)
    if kind == "npy":
        arr = read_npy(path)
        info = read_json(sidecar(path))
        if arr.ndim != 4 or arr.shape[0] != 3:
            raise ValueError(f"{path}: expected a (3, z, y, x) field, got shape {arr.shape}")
        return DisplacementField(check_finite(arr, path), Geometry.from_dict(info["geometry"]), info.get("meta", {}))
    if kind in ("nifti", "sitk"):
        img = _read_sitk(path)
        if img.GetNumberOfComponentsPerPixel() != 3 or img.GetDimension() != 3:
            raise ValueError(f"{path}: expected a 3D image with 3-component vectors")
        arr, geom = from_sitk(img, vector=True)
        return DisplacementField(check_finite(arr, path), geom, {"source": str(path)})
    raise ValueError(f"{path}: not a displacement field format")
