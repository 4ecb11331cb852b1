"""Landmark readers: every reader returns world points in LPS millimetres, shape ``(N, 3)`` ordered ``(x, y, z)``.

Formats and their source conventions (see the README of each folder under ``shared/data``):

* POPI ``.pts`` (:func:`read_popi_pts`): header ``#X Y Z`` then tab-separated ``X Y Z`` in mm in the frame of
  the POPI MetaImage (origin 0, identity direction, a crop of the original 512x512 DICOM slices).  To land in
  the DICOM patient frame (LPS) an offset is added; :data:`POPI_PHASE00_OFFSET_XYZ` is the one derived for the
  POPI phase-00 DICOM series in ``shared/data/popi-4dct-phase00`` (``x = X - 247.0703``, ``y = Y - 145.4453``,
  ``z = Z - 164.5``; about +-1 voxel in-plane uncertainty).
* POPI LPS CSV (:func:`read_popi_csv`): ``phase_percent,landmark_id,x_lps_mm,y_lps_mm,z_lps_mm``, already LPS mm.
* DIR-Lab text (:func:`read_dirlab_txt`): three integers ``x y z`` per line, **1-based** voxel indices (column,
  row, slice) of the DIR-Lab image grid.  DIR-Lab images are headerless, so there is no origin or direction:
  without a :class:`Geometry` the points are placed in a frame with voxel ``(1, 1, 1)`` at the origin and
  identity direction, i.e. ``world = (index - 1) * spacing``; distances and displacements are then exact.
* elastix point sets (:func:`read_elastix_points`): line 1 ``point`` (physical mm, ITK = LPS) or ``index``
  (0-based ITK index ``i j k``), line 2 the count, then one ``x y z`` per line.

Bad files raise :class:`LandmarkFileError`, a one-line message naming the file and line.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from ..core.geometry import Geometry
from .atomic import read_json, write_json

#: LPS offset (mm) added to POPI ``.pts`` coordinates to reach the POPI phase-00 DICOM series in shared/data
#: (derived in that folder's README from a crop-offset fit: column +3, row +19 voxels of 0.9765625 mm,
#: origin (-250, -164, -164.5)).
POPI_PHASE00_OFFSET_XYZ: tuple[float, float, float] = (-250.0 + 3 * 0.9765625, -164.0 + 19 * 0.9765625, -164.5)

#: DIR-Lab 4D-CT published voxel spacing (x, y, z) in mm and grid size (x, y, z), cases 1-10.
#: Source: www.dir-lab.com "4DCT data" table; R. Castillo et al., Phys. Med. Biol. 54:1849-1870 (2009)
#: (cases 1-5) and E. Castillo et al., Phys. Med. Biol. 55:305-327 (2010) (cases 6-10); the same values are
#: in shared/data/dirlab-4dct-landmarks/README.md.  The published TRE figures use these rounded spacings.
DIRLAB_SPACING_XYZ: dict[int, tuple[float, float, float]] = {
    1: (0.97, 0.97, 2.5),
    2: (1.16, 1.16, 2.5),
    3: (1.15, 1.15, 2.5),
    4: (1.13, 1.13, 2.5),
    5: (1.10, 1.10, 2.5),
    6: (0.97, 0.97, 2.5),
    7: (0.97, 0.97, 2.5),
    8: (0.97, 0.97, 2.5),
    9: (0.97, 0.97, 2.5),
    10: (0.97, 0.97, 2.5),
}
DIRLAB_SHAPE_XYZ: dict[int, tuple[int, int, int]] = {
    1: (256, 256, 94),
    2: (256, 256, 112),
    3: (256, 256, 104),
    4: (256, 256, 99),
    5: (256, 256, 106),
    6: (512, 512, 128),
    7: (512, 512, 136),
    8: (512, 512, 128),
    9: (512, 512, 128),
    10: (512, 512, 120),
}

_DIRLAB_CASE = re.compile(r"case(\d+)", re.IGNORECASE)


class LandmarkFileError(ValueError):
    """A landmark file that cannot be read; the message names the file (and line)."""


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="strict").splitlines()
    except FileNotFoundError:
        raise LandmarkFileError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise LandmarkFileError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None


def _parse_triples(path: Path, lines: list[str], first_line: int, sep: str | None = None) -> np.ndarray:
    """Parse ``lines`` (numbered from ``first_line``, 1-based) as rows of three numbers; blank lines skipped."""
    rows = []
    for n, line in enumerate(lines, start=first_line):
        text = line.strip()
        if not text:
            continue
        parts = text.split(sep) if sep else text.split()
        if len(parts) != 3:
            raise LandmarkFileError(f"{path}:{n}: expected 3 numbers, got {len(parts)} in {text[:60]!r}")
        try:
            row = [float(p) for p in parts]
        except ValueError:
            raise LandmarkFileError(f"{path}:{n}: not a number in {text[:60]!r}") from None
        if not np.all(np.isfinite(row)):
            raise LandmarkFileError(f"{path}:{n}: non-finite coordinate in {text[:60]!r}")
        rows.append(row)
    if not rows:
        raise LandmarkFileError(f"{path}: no landmarks found")
    return np.asarray(rows, dtype=np.float64)


def read_popi_pts(
    path: str | os.PathLike, offset_xyz: tuple[float, float, float] = POPI_PHASE00_OFFSET_XYZ
) -> np.ndarray:
    """POPI ``.pts`` landmarks -> LPS mm ``(N, 3)``: ``POPI (X, Y, Z) + offset_xyz``.

    ``offset_xyz`` defaults to the POPI phase-00 DICOM series of shared/data; pass ``(0, 0, 0)`` for the raw
    POPI MetaImage frame.
    """
    path = Path(path)
    lines = _read_lines(path)
    if not lines or not lines[0].lstrip().startswith("#"):
        raise LandmarkFileError(f"{path}:1: expected a '#X Y Z' header line (POPI .pts)")
    return _parse_triples(path, lines[1:], first_line=2) + np.asarray(offset_xyz, dtype=np.float64)


_POPI_CSV_COLUMNS = ("phase_percent", "landmark_id", "x_lps_mm", "y_lps_mm", "z_lps_mm")


def read_popi_csv(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """POPI landmarks converted to LPS mm (``popi_landmarks_lps_mm.csv``) -> ``{phase %: (N, 3)}``.

    Rows are ordered by ``landmark_id`` within each phase, so row i is the same point in every phase.
    """
    path = Path(path)
    lines = _read_lines(path)
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != _POPI_CSV_COLUMNS:
        raise LandmarkFileError(f"{path}:1: expected header {','.join(_POPI_CSV_COLUMNS)}")
    per_phase: dict[int, dict[int, list[float]]] = {}
    for n, row in enumerate(reader, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 5:
            raise LandmarkFileError(f"{path}:{n}: expected 5 columns, got {len(row)}")
        try:
            phase, lid = int(row[0]), int(row[1])
            xyz = [float(v) for v in row[2:]]
        except ValueError:
            raise LandmarkFileError(f"{path}:{n}: not a number in {','.join(row)[:60]!r}") from None
        if not np.all(np.isfinite(xyz)):
            raise LandmarkFileError(f"{path}:{n}: non-finite coordinate")
        if lid in per_phase.setdefault(phase, {}):
            raise LandmarkFileError(f"{path}:{n}: landmark {lid} of phase {phase} appears twice")
        per_phase[phase][lid] = xyz
    if not per_phase:
        raise LandmarkFileError(f"{path}: no landmarks found")
    ids = sorted(next(iter(per_phase.values())))
    out = {}
    for phase in sorted(per_phase):
        if sorted(per_phase[phase]) != ids:
            raise LandmarkFileError(f"{path}: phase {phase} does not have the same landmark ids as the others")
        out[phase] = np.asarray([per_phase[phase][i] for i in ids], dtype=np.float64)
    return out


def dirlab_case_number(path: str | os.PathLike) -> int:
    """Case number from a DIR-Lab file name or folder (``Case1_300_T00_xyz.txt``, ``case1/...``)."""
    path = Path(path)
    for part in (path.name, *(p.name for p in path.parents)):
        m = _DIRLAB_CASE.search(part)
        if m:
            return int(m.group(1))
    raise LandmarkFileError(f"{path}: cannot tell the DIR-Lab case number from the name; pass case= or spacing_xyz=")


def read_dirlab_txt(
    path: str | os.PathLike,
    case: int | None = None,
    spacing_xyz: tuple[float, float, float] | None = None,
    geometry: Geometry | None = None,
) -> np.ndarray:
    """DIR-Lab landmark file (1-based voxel indices ``x y z``) -> LPS mm ``(N, 3)``.

    With ``geometry`` (the case's image read with its real orientation) the 0-based index ``(x-1, y-1, z-1)`` is
    mapped through it.  Otherwise ``world = (index - 1) * spacing`` (origin at voxel (1,1,1), identity
    direction), with ``spacing_xyz`` or the published spacing of ``case`` (inferred from the file name when
    neither is given; see :data:`DIRLAB_SPACING_XYZ`).
    """
    path = Path(path)
    idx = _parse_triples(path, _read_lines(path), first_line=1)
    bad = np.nonzero(np.any(idx < 1, axis=1) | np.any(idx != np.round(idx), axis=1))[0]
    if bad.size:
        raise LandmarkFileError(f"{path}:{bad[0] + 1}: DIR-Lab indices must be positive integers (1-based)")
    zero_based = idx - 1.0
    if geometry is not None:
        return geometry.index_to_world(zero_based[:, ::-1])
    if spacing_xyz is None:
        case = dirlab_case_number(path) if case is None else case
        if case not in DIRLAB_SPACING_XYZ:
            raise LandmarkFileError(f"{path}: unknown DIR-Lab case {case} (known: 1-10)")
        spacing_xyz = DIRLAB_SPACING_XYZ[case]
    # headerless grid: voxel (1, 1, 1) at the origin, identity direction, large enough to hold the points
    frame = Geometry.from_itk(np.max(idx, axis=0).astype(int), spacing_xyz, (0.0, 0.0, 0.0), np.eye(3).ravel())
    return frame.index_to_world(zero_based[:, ::-1])


def read_elastix_points(path: str | os.PathLike, geometry: Geometry | None = None) -> np.ndarray:
    """elastix/transformix point set -> LPS mm ``(N, 3)``.

    ``point`` files are physical ITK coordinates (LPS mm) and are returned as they are; ``index`` files hold
    0-based ITK indices ``(i, j, k)`` = array ``[k, j, i]`` and need the image ``geometry``.
    """
    path = Path(path)
    lines = _read_lines(path)
    if len(lines) < 2:
        raise LandmarkFileError(f"{path}: too short for an elastix point set (needs 'point'/'index' and a count)")
    kind = lines[0].strip().lower()
    if kind not in ("point", "index"):
        raise LandmarkFileError(f"{path}:1: expected 'point' or 'index', got {lines[0].strip()[:40]!r}")
    try:
        count = int(lines[1].strip())
    except ValueError:
        raise LandmarkFileError(f"{path}:2: expected the number of points, got {lines[1].strip()[:40]!r}") from None
    pts = _parse_triples(path, lines[2:], first_line=3)
    if len(pts) != count:
        raise LandmarkFileError(f"{path}:2: header says {count} points, file has {len(pts)}")
    if kind == "index":
        if geometry is None:
            raise LandmarkFileError(f"{path}: an 'index' point set needs the image geometry to give mm")
        return geometry.index_to_world(pts[:, ::-1])
    return pts


# ---------------------------------------------------------------------- layout landmarks.json
LANDMARKS_JSON_FRAME = "LPS mm (x, y, z)"


def write_landmarks_json(path: str | os.PathLike, points: dict[int, np.ndarray]) -> None:
    """Write ``{phase %: (N, 3) LPS mm}`` as the layout's ``landmarks.json`` (atomic).

    Schema: ``{"frame": "LPS mm (x, y, z)", "phases": {"00": [[x, y, z], ...], "50": [...]}}`` (extra keys such as
    the phantom's ``kind`` / ``in_lung`` are allowed and ignored by the reader); row i is the same
    anatomical point in every phase.
    """
    n = {len(np.asarray(p)) for p in points.values()}
    if len(n) > 1:
        raise ValueError(f"every phase needs the same number of landmarks, got {sorted(n)}")
    phases = {}
    for phase, pts in sorted(points.items()):
        arr = np.asarray(pts, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise ValueError(f"landmarks of phase {phase} must be (N, 3), got {arr.shape}")
        phases[f"{int(phase):02d}"] = arr.tolist()
    write_json(path, {"frame": LANDMARKS_JSON_FRAME, "phases": phases})


def read_landmarks_json(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """Read the layout's ``landmarks.json`` (see :func:`write_landmarks_json`) -> ``{phase %: (N, 3)}``."""
    path = Path(path)
    if not path.exists():
        raise LandmarkFileError(f"{path}: no such file")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("frame") != LANDMARKS_JSON_FRAME or not isinstance(data.get("phases"), dict):
        raise LandmarkFileError(f"{path}: not a landmarks.json (needs frame {LANDMARKS_JSON_FRAME!r} and phases)")
    out: dict[int, np.ndarray] = {}
    for key, rows in data["phases"].items():
        try:
            arr = np.asarray(rows, dtype=np.float64)
            phase = int(key)
        except (TypeError, ValueError):
            raise LandmarkFileError(f"{path}: phase {key!r} is not a list of [x, y, z] numbers") from None
        if arr.ndim != 2 or arr.shape[1] != 3 or not np.all(np.isfinite(arr)):
            raise LandmarkFileError(f"{path}: phase {key!r} must be finite (N, 3) points, got shape {arr.shape}")
        out[phase] = arr
    if len({len(a) for a in out.values()}) > 1:
        raise LandmarkFileError(f"{path}: phases have different numbers of landmarks")
    return dict(sorted(out.items()))
