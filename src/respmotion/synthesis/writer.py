"""Writing one synthesized sample's phases as they come (:class:`CycleWriter`), in the formats asked for.

Outputs in ``out/sample_XX/`` by ``formats`` (:data:`respmotion.synthesis.pipeline.FORMATS`):

* ``nifti``: ``phase_XX.nii.gz`` (int16 HU, :func:`hu_int16`) and ``dvf_XX.nii.gz``; ``mha``: the same as
  ``.mha`` (:data:`VOLUME_SUFFIX`);
* ``dicom``: ``dicom/phase_XX/`` CT series in the input's study (DICOM input,
  :class:`respmotion.io.dicom_export.DicomCycleWriter`) and, with structures, ``dicom/rtstruct_phase_XX.dcm``
  (every structure and its ITV on that phase);
* ``nifti4d``: ``ct_4d.nii.gz`` (x, y, z, phase; int16; holds every phase in memory while built).

Fields ``dvf_XX`` are float32 ITK displacement fields (LPS mm, pull) on the grid the motion model made them on
(the model grid, covering the CT's field of view): ITK's ``DisplacementFieldTransform`` and 3D Slicer
interpolate them linearly at the CT's voxels, exactly as :func:`respmotion.synthesis.native.warp_native` does,
so resampling the input CT with them gives phase XX.  Structures: ``structures/<name>_XX.nii.gz`` and
``<name>_ITV.nii.gz`` (uint8) with ``nifti``.  The sample's record (per-phase field statistics on the field's
grid, lung measures, structure motion, DICOM series) goes into ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..core.geometry import Geometry
from ..core.types import DisplacementField, Volume
from ..io.atomic import atomic_path
from ..io.volumes import save_field, save_volume

#: file suffix of the per-phase volume formats
VOLUME_SUFFIX = {"nifti": "nii.gz", "mha": "mha"}


def hu_int16(array: np.ndarray) -> np.ndarray:
    """HU rounded to the nearest integer (half to even) and clipped to int16 (what the files store)."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32)).round().clamp_(-32768, 32767).to(torch.int16).numpy()


def _field_stats(f: DisplacementField) -> dict:
    from ..core.ops import jacobian_determinant

    mag = f.magnitude()
    det = jacobian_determinant(f)
    return {"mean_mm": float(mag.mean()), "max_mm": float(mag.max()), "folding_percent": float((det <= 0).mean() * 100),
            "min_jacobian": float(det.min())}


class CycleWriter:
    """Writes one sample's phases as they come (``phase``), then the ITVs and RTSTRUCTs (``finish``).

    Holds per structure only its ITV and its traced contours per phase; ``nifti4d`` holds the
    int16 phases until the end.
    """

    def __init__(self, sdir: Path, ct: Volume, phases: list[int], formats: tuple[str, ...],
                 structures: Sequence[str], template: str | None) -> None:
        from .contours import MotionAccumulator

        self.sdir, self.geometry, self.formats, self.phases = sdir, ct.geometry, formats, phases
        self.names = list(structures)
        self.motion = {n: MotionAccumulator(ct.geometry) for n in self.names}
        self.contours: dict[int, dict[str, list]] = {}
        self.stack: np.ndarray | None = None
        self.dicom = None
        self.dicom_result: dict | None = None  # DicomCycleWriter.finish()'s result
        if "dicom" in formats:
            from ..io.dicom_export import DicomCycleWriter

            self.dicom = DicomCycleWriter(sdir / "dicom", ct.geometry, phases, template, overwrite=True)
        self.record: dict = {"dir": str(sdir), "phases": {}}

    def phase(self, k: int, hu: np.ndarray, field_: DisplacementField, occupancy: Mapping[str, np.ndarray],
              lung: dict | None = None) -> None:
        """Phase ``k``: HU ``(z, y, x)`` float32 on the CT grid, its field (model grid), structure occupancies,
        its lung measures (:class:`respmotion.synthesis.sanity.LungRecord`)."""
        stored = hu_int16(hu)
        vol = Volume(stored, self.geometry)
        for fmt, suffix in VOLUME_SUFFIX.items():
            if fmt in self.formats:
                save_volume(vol, self.sdir / f"phase_{k:02d}.{suffix}")
                save_field(field_, self.sdir / f"dvf_{k:02d}.{suffix}")
        if "nifti4d" in self.formats:
            if self.stack is None:
                self.stack = np.empty(self.geometry.shape[::-1] + (len(self.phases),), dtype=np.int16)
            self.stack[..., self.phases.index(k)] = stored.transpose(2, 1, 0)
        if self.dicom is not None:
            self.dicom.write(k, vol)
        self.record["phases"][f"{k:02d}"] = _field_stats(field_)
        if lung is not None:
            self.record["phases"][f"{k:02d}"]["lung"] = lung
        if self.names:
            from ..io.rtstruct import mask_contours

            self.contours[k] = {}
            for name in self.names:
                occ = np.clip(occupancy[name], 0.0, 1.0)
                self.motion[name].add(k, occ)
                binary = (occ >= 0.5).astype(np.uint8)
                if "nifti" in self.formats:
                    save_volume(Volume(binary, self.geometry), self.sdir / "structures" / f"{name}_{k:02d}.nii.gz")
                if self.dicom is not None:
                    self.contours[k][name] = mask_contours(binary)

    def finish(self) -> dict:
        """The 4D NIfTI, ITVs, DICOM series moved into place and one RTSTRUCT per phase; the summary record."""
        if self.stack is not None:
            _write_4d_nifti(self.sdir / "ct_4d.nii.gz", self.stack, self.geometry)
        if self.names:
            from .contours import motion_summary

            motions = {n: acc.result() for n, acc in self.motion.items()}
            self.record["structures"] = {n: motion_summary(m) for n, m in motions.items()}
            if "nifti" in self.formats:
                for n, m in motions.items():
                    save_volume(Volume(m["itv"], self.geometry), self.sdir / "structures" / f"{n}_ITV.nii.gz")
        if self.dicom is not None:
            exported = self.dicom.finish()
            self.record["dicom"] = {k: v for k, v in exported.items() if k != "series"}
            self.record["dicom"]["series"] = {f"{k:02d}": ref.to_dict() for k, ref in exported["series"].items()}
            if self.names:
                from ..io.rtstruct import mask_contours, write_rtstruct_contours

                itv = {f"{n}_ITV": mask_contours(m["itv"]) for n, m in motions.items()}
                self.record["dicom"]["rtstruct"] = []
                for k, ref in exported["series"].items():
                    path = self.sdir / "dicom" / f"rtstruct_phase_{k:02d}.dcm"
                    write_rtstruct_contours({**self.contours[k], **itv}, ref, path,
                                            description=f"respmotion structures, Gated, {k:02d}%")
                    self.record["dicom"]["rtstruct"].append(str(path))
            self.dicom_result = exported
        return self.record

    def abort(self) -> None:
        if self.dicom is not None:
            self.dicom.abort()


def _write_4d_nifti(path: Path, stack_xyzp: np.ndarray, geometry: Geometry) -> None:
    import nibabel as nib

    from ..io.volumes import nifti_affine

    img = nib.Nifti1Image(stack_xyzp, nifti_affine(geometry))
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
