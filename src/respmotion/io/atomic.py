"""Atomic file writes: write to a temporary file in the target folder, then rename.

A reader never sees a half-written file, and a crash (even kill -9) leaves either the old file
or the new one, plus at worst a stray ``.tmp-*`` file that later runs ignore and clean up.  A
failed write (disk full, no permission) removes its temporary file and raises an ``OSError``
naming the target file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    ``suffix`` defaults to the target's own suffixes so writers that pick a format from the
    file name (SimpleITK, nibabel) still see it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(path.suffixes)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.stem.split(".")[0] + "-", suffix=sfx, dir=path.parent)
    except OSError as exc:  # no permission, disk full: name the file the caller wanted, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:  # e.g. ENOSPC inside a writer: name the target
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        if exc.filename is None:  # numpy's short write ("N requested and M written") carries no errno
            raise OSError(None, f"write cut short ({exc}); is the disk full?", str(path)) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def read_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """The array of an ``.npy`` file (memory-mapped read-only with ``mmap``); a missing file raises
    ``FileNotFoundError``, a truncated or foreign one a ``ValueError`` naming it (and, when cut short,
    how many of its bytes are there)."""
    path = Path(path)
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file") from exc
        raise ValueError(f"{path}: not a readable .npy array ({_npy_cut_short(path) or exc})") from exc


def _npy_cut_short(path: Path) -> str:
    """``"cut short: N of M bytes"`` when an ``.npy`` file's header promises more data than it holds, else ""."""
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = header(fh)
        except (ValueError, EOFError, SyntaxError):
            return ""
        want = fh.tell() + math.prod(shape) * dtype.itemsize
    have = path.stat().st_size
    return f"cut short: {have} of {want} bytes" if have < want else ""


def read_npz(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Arrays ``keys`` (default: all) of an ``.npz`` archive, as ``{name: array}``.

    ``keys=()`` reads only the archive's index: a cheap check that the file is whole (a truncated
    archive loses its index, which sits at the end).  A missing file raises ``FileNotFoundError``;
    a truncated, damaged or foreign file, or a missing key, a one-line ``ValueError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("an .npy array, not an .npz archive")
            wanted = z.files if keys is None else list(keys)
            missing = [k for k in wanted if k not in z.files]
            if missing:
                raise ValueError(f"no array {missing[0]!r} (has {', '.join(z.files) or 'none'})")
            return {k: np.array(z[k]) for k in wanted}
    except (zipfile.BadZipFile, zlib.error, EOFError, SyntaxError, tokenize.TokenError) as exc:
        # damaged bytes inside a member: numpy fails while parsing its header or inflating its data
        raise ValueError(f"{path}: not a readable .npz archive (cut short or damaged: {exc})") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: not a readable .npz archive ({exc})") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def clean_stale_tmp(folder: str | os.PathLike) -> int:
    """Remove temporary files left by an interrupted writer under ``folder``; returns the count.
    Call it only where no other process writes (e.g. inside the folder owner's lock, :mod:`.ownership`)."""
    n = 0
    for p in Path(folder).rglob(TMP_PREFIX + "*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (provenance records of checkpoints, priors, latent sets)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
