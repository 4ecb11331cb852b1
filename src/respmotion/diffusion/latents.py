"""The latent set: every (reference CT, displacement field) of a cohort encoded by the two
autoencoders into a mirror tree, and the dataset the diffusion model trains on.

Layout (mirrors :mod:`respmotion.io.layout`)::

    <out>/provenance.json                 # which autoencoders (path, sha256, step, latent_scale,
                                          # units, architecture), data folder, field sources
    <out>/<patient>/<study>/image_00.npy  # image latent (Ci, Z', Y', X') float32 (also image_XX with
                                          # image_phases=all)
    <out>/<patient>/<study>/dvf_ref_40.npy, dvf_step_40.npy ...   # DVF latents (Cd, Z', Y', X')
    <out>/<patient>/<study>/latents.json  # written last: the study is complete (files, shapes, and the
                                          # reference CT's lung features: respmotion.anatomy.features)

Latents are the autoencoders' ``encode_latent`` outputs: the latent *mean* times the
autoencoder's ``latent_scale`` (1 / std of its training latents; recorded in the provenance).
When the DVF autoencoder was trained with a motion prior (:mod:`respmotion.models.prior`,
recorded in its checkpoint and copied to ``provenance["dvf_autoencoder"]["motion_prior"]``),
``dvf_<id>.npy`` encodes the residual ``u - u_bar[id]``, not the field itself.
Writing: every file is atomic; a study whose marker exists is skipped, and within an
interrupted study only missing files are computed, so a rerun (after kill -9) resumes.  Work
is sharded by study: rank ``r`` of ``W`` takes studies ``r, r + W, ...`` of the sorted list
(``--rank/--world-size`` or torchrun's ``RANK``/``WORLD_SIZE``; each rank uses
``cuda:LOCAL_RANK`` when CUDA is there).  A rerun against different autoencoder checkpoints
is refused instead of mixing latents of two encoders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..anatomy.features import LUNG_FEATURES, lung_features
from ..io.atomic import clean_stale_tmp, file_sha256, read_json, read_npy, read_npz, write_json, write_npy
from ..io.layout import PHASES, REFERENCE_PHASE, StudyDir, iter_studies
from ..runtime import resolve_device, resolve_rank

log = logging.getLogger("respmotion")

FORMAT = "respmotion.latents/1"
PROVENANCE = "provenance.json"
STUDY_MARKER = "latents.json"


# ---------------------------------------------------------------------------- sharding
def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Items ``rank, rank + world_size, ...`` (disjoint, together complete)."""
    return list(items[rank::world_size])


# ---------------------------------------------------------------------------- provenance
def autoencoder_record(path: str | os.PathLike, model: torch.nn.Module) -> dict[str, Any]:
    """What identifies an autoencoder checkpoint in the provenance."""
    from ..io.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    extra = ckpt.get("extra", {}) or {}
    return {
        "path": str(Path(path).resolve()),
        "sha256": file_sha256(path),
        "step": int(ckpt.get("step", -1)),
        "latent_scale": float(model.latent_scale),
        "model_config": ckpt.get("model_config", {}),
        "split": extra.get("split"),
        "motion_prior": extra.get("motion_prior", {"mode": "none"}),
    }


def _same_encoders(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("image_autoencoder", "dvf_autoencoder")
    return all(a.get(k, {}).get("sha256") == b.get(k, {}).get("sha256") for k in keys) and \
        list(a.get("fields", [])) == list(b.get("fields", [])) and a.get("image_phases") == b.get("image_phases")


def read_provenance(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / PROVENANCE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a latent set (no {PROVENANCE}; run `respmotion latents`)")
    prov = read_json(path)
    if prov.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown latent set format {prov.get('format')!r}")
    return prov


# ---------------------------------------------------------------------------- encoding
def latent_study_dir(out: Path, study: StudyDir) -> Path:
    return out / study.patient / study.study


def _encode(model: torch.nn.Module, arrays: list[np.ndarray], device: torch.device) -> list[np.ndarray]:
    x = torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False)).to(device)
    with torch.no_grad():
        z = model.encode_latent(x)
    return [a for a in z.float().cpu().numpy()]


def expected_field_ids(source_name: str) -> list[str]:
    """Every field id of a complete study for a source name (``gt_step``: step_00..step_90,
    ``gt_ref`` / ``reg_ref@DIR``: ref_10..ref_90)."""
    kind = source_name.split("@", 1)[0].rsplit("_", 1)[-1]
    return [f"{kind}_{p:02d}" for p in PHASES if not (kind == "ref" and p == REFERENCE_PHASE)]


def check_field_set(study: StudyDir, source: Any) -> None:
    """A study has all of a source's fields or none of them (e.g. a real study without ground
    truth); a partial set (a lost ``gt/dvf_step_30.npy``) is an error naming the missing file, and
    so is a field file cut short (its header or archive index is read, not its data)."""
    if not source.name.startswith(("gt_", "reg_")):
        return  # another source (an adapter): its own field_ids are the whole set
    have = set(source.field_ids(study))
    missing = [fid for fid in expected_field_ids(source.name) if fid not in have]
    if have and missing:
        kind, pct = field_kind(missing[0])
        name = study.gt_path(kind, pct) if source.name.startswith("gt_") else f"{source.name} field {missing[0]}"
        raise ValueError(f"{name}: missing ({len(missing)} of the study's {source.name} fields are missing, "
                         f"{len(have)} present); restore it or remove the study")
    for fid in sorted(have):  # a truncated file is named now, not after other studies were written
        if source.name.startswith("reg_"):
            read_npz(source.path(study, fid), ())
        else:
            read_npy(study.gt_path(*field_kind(fid)), mmap=True)


def encode_study(
    study: StudyDir,
    out_dir: Path,
    image_ae: torch.nn.Module,
    dvf_ae: torch.nn.Module,
    sources: Sequence[Any],
    image_phases: Sequence[int],
    device: torch.device,
    batch: int = 4,
    prior: Any = None,
) -> int:
    """Encode one study into ``out_dir`` (missing files only); returns the number of files written.

    ``sources`` are :class:`respmotion.training.data.FieldSource` objects; images are encoded
    from HU, fields from mm, by the autoencoders' ``encode_latent``; with ``prior``
    (:class:`respmotion.models.prior.MotionPrior`) the field's residual to the prior (for the study's lung
    features when the prior is regressed) is encoded.
    """
    written = 0
    files: dict[str, list[int]] = {}
    ref = study.load_phase(REFERENCE_PHASE)
    try:  # recorded either way: a model conditioned on anatomy refuses a set without them when it trains
        anatomy: dict[str, Any] = dict(zip(LUNG_FEATURES, lung_features(ref.array, ref.geometry.spacing).tolist()))
    except ValueError as exc:
        anatomy = {"error": f"{study.phase_path(REFERENCE_PHASE)}: {exc}"}
    todo_img = [p for p in image_phases if not (out_dir / f"image_{p:02d}.npy").exists()]
    for i in range(0, len(todo_img), batch):
        chunk = todo_img[i:i + batch]
        lat = _encode(image_ae, [(ref if p == REFERENCE_PHASE else study.load_phase(p)).array[None] for p in chunk],
                      device)
        for p, z in zip(chunk, lat):
            write_npy(out_dir / f"image_{p:02d}.npy", z)
            written += 1
    for p in image_phases:
        files[f"image_{p:02d}.npy"] = list(read_npy(out_dir / f"image_{p:02d}.npy", mmap=True).shape)
    ids = [fid for src in sources for fid in src.field_ids(study)]
    owner = {fid: src for src in sources for fid in src.field_ids(study)}
    todo = [fid for fid in ids if not (out_dir / f"dvf_{fid}.npy").exists()]
    features = None
    if prior is not None and prior.needs_features:
        if "error" in anatomy:
            raise ValueError(f"{anatomy['error']} (the DVF autoencoder's regressed motion prior needs the lung features)")
        features = [anatomy[k] for k in LUNG_FEATURES]

    def field(fid: str) -> np.ndarray:
        arr = owner[fid].load(study, fid).array
        if prior is None:
            return arr
        prior.check_shape(arr.shape[1:], f"{study.key} {fid}")
        return prior.residual(fid, arr, features)

    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        lat = _encode(dvf_ae, [field(f) for f in chunk], device)
        for fid, z in zip(chunk, lat):
            write_npy(out_dir / f"dvf_{fid}.npy", z)
            written += 1
    for fid in ids:
        files[f"dvf_{fid}.npy"] = list(read_npy(out_dir / f"dvf_{fid}.npy", mmap=True).shape)
    write_json(out_dir / STUDY_MARKER, {"study": study.key, "source": str(study.path.resolve()), "files": files,
                                        "anatomy": anatomy})
    return written


def build_latent_set(
    data: str | os.PathLike,
    out: str | os.PathLike,
    image_ae_path: str | os.PathLike,
    dvf_ae_path: str | os.PathLike,
    fields: Sequence[str] = ("gt_ref", "gt_step"),
    image_phases: str = "reference",
    device: str = "auto",
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode this rank's shard of the cohort at ``data`` into ``out`` (see module docstring).

    Returns a summary: studies done/skipped, files written, seconds.
    """
    from ..models.autoencoder import load_autoencoder
    from ..models.prior import prior_from_record
    from ..training.data import field_source

    if image_phases not in ("reference", "all"):
        raise ValueError(f"image_phases must be 'reference' or 'all', got {image_phases!r}")
    r, world = resolve_rank(rank, world_size)
    dev = resolve_device(device)
    out = Path(out)
    image_ae, dvf_ae = (load_autoencoder(str(p), map_location=dev) for p in (image_ae_path, dvf_ae_path))
    if image_ae.cfg.kind != "image" or dvf_ae.cfg.kind != "dvf":
        raise ValueError(f"expected an image and a DVF autoencoder, got kinds {image_ae.cfg.kind!r} ({image_ae_path}) "
                         f"and {dvf_ae.cfg.kind!r} ({dvf_ae_path})")
    sources = [field_source(name) for name in fields]
    prov = {
        "format": FORMAT,
        "data": str(Path(data).resolve()),
        "image_autoencoder": autoencoder_record(image_ae_path, image_ae),
        "dvf_autoencoder": autoencoder_record(dvf_ae_path, dvf_ae),
        "fields": list(fields),
        "image_phases": image_phases,
        "units": {"image_input": "HU", "dvf_input": "mm (z, y, x), pull",
                  "latents": "autoencoder mean latent times its latent_scale"},
    }
    prior = prior_from_record(prov["dvf_autoencoder"]["motion_prior"], Path(dvf_ae_path).parent)
    if prior is not None:
        prov["units"]["dvf_input"] += "; minus the DVF autoencoder's motion prior u_bar[field id]"
    studies = list(iter_studies(data))
    if not studies:
        raise ValueError(f"{data}: no complete studies to encode")
    mine = shard(studies, r, world)
    for study in mine:  # a partial field set is refused before anything is written
        for src in sources:
            check_field_set(study, src)
    if (out / PROVENANCE).exists():
        old = read_provenance(out)
        if not _same_encoders(old, prov):
            raise ValueError(f"{out}: holds latents of other autoencoders/fields ({old['image_autoencoder']['path']}, "
                             f"{old['dvf_autoencoder']['path']}, {old.get('fields')}); use a new --out")
    else:
        write_json(out / PROVENANCE, {**prov, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    phases = [REFERENCE_PHASE] if image_phases == "reference" else list(PHASES)
    t0 = time.perf_counter()
    done = skipped = files = 0
    it = mine
    if progress:
        from tqdm import tqdm

        it = tqdm(mine, desc=f"latents rank {r}/{world}", unit="study")
    with contextlib.closing(it) if progress else contextlib.nullcontext():  # a bar is closed on errors too
        for study in it:
            sdir = latent_study_dir(out, study)
            if (sdir / STUDY_MARKER).exists():
                skipped += 1
                continue
            if sdir.is_dir():  # an interrupted earlier run's temporary files (this study is this rank's alone)
                clean_stale_tmp(sdir)
            files += encode_study(study, sdir, image_ae, dvf_ae, sources, phases, dev, prior=prior)
            done += 1
    summary = {"rank": r, "world_size": world, "studies": len(mine), "encoded": done, "skipped": skipped,
               "files_written": files, "seconds": round(time.perf_counter() - t0, 2), "device": str(dev)}
    log.info("latents rank %d/%d: %d studies encoded, %d already there, %d files in %.1f s", r, world, done,
             skipped, files, summary["seconds"])
    return summary


# ---------------------------------------------------------------------------- dataset
def field_kind(field_id: str) -> tuple[str, int]:
    """``"ref_40"`` -> ``("ref", 40)``."""
    kind, _, pct = field_id.rpartition("_")
    if not kind or not pct.isdigit():
        raise ValueError(f"field id {field_id!r} is not <kind>_<phase>")
    return kind, int(pct)


class LatentDataset(Dataset):
    """Training items of the diffusion model for one target mode.

    Item: ``{"x": DVF latent (Cd, Z, Y, X), "image": reference image latent (Ci, Z, Y, X),
    "phase": phase index 0..9 (long), "key": str}`` plus ``"features"`` (F,) float32, the reference CT's lung
    features (:data:`~respmotion.anatomy.features.LUNG_FEATURES`), when the latent set holds them.  ``target="ref"``: fields ``ref_10..ref_90``
    (phase k relative to 00); ``"step"``: ``step_00..step_90`` (phase k -> k + 10).  The image is
    always the reference phase's: synthesis conditions on one CT.
    """

    def __init__(self, root: str | os.PathLike, patients: Sequence[str] | None, target: str = "ref") -> None:
        if target not in ("ref", "step"):
            raise ValueError(f"target must be ref or step, got {target!r}")
        self.root = Path(root)
        self.target = target
        read_provenance(self.root)
        wanted = set(patients) if patients is not None else None
        self.items: list[tuple[Path, str, int]] = []
        self.features: dict[Path, np.ndarray] = {}  # per study folder; empty for a set made without them
        self.without_features: tuple[Path, str] | None = None  # (study folder, why) of one without features
        missing = []
        for marker in sorted(self.root.glob(f"*/*/{STUDY_MARKER}")):
            sdir = marker.parent
            if wanted is not None and sdir.parent.name not in wanted:
                continue
            info = read_json(marker)
            names = info["files"]
            anatomy = info.get("anatomy") or {}
            if all(k in anatomy for k in LUNG_FEATURES):
                self.features[sdir] = np.array([anatomy[k] for k in LUNG_FEATURES], np.float32)
            else:
                missing.append((sdir, anatomy.get("error", "a latent set made before they were recorded")))
            for name in sorted(names):
                if not name.startswith("dvf_"):
                    continue
                kind, pct = field_kind(name[4:-4])
                if kind == target and not (kind == "ref" and pct == REFERENCE_PHASE):
                    self.items.append((sdir, name, pct))
        if missing:  # all or none: a batch must be uniform
            self.features = {}
            self.without_features = missing[0]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sdir, name, pct = self.items[i]
        x = read_npy(sdir / name)
        img = read_npy(sdir / f"image_{REFERENCE_PHASE:02d}.npy")
        if x.shape[1:] != img.shape[1:]:
            raise ValueError(f"{sdir}: DVF latent {x.shape} and image latent {img.shape} differ in size")
        item = {"x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                "image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)),
                "phase": torch.tensor(pct // 10, dtype=torch.long),
                "key": f"{sdir.parent.name}/{sdir.name}/{name[:-4]}"}
        if self.features:
            item["features"] = torch.from_numpy(self.features[sdir])
        return item

    @property
    def patients(self) -> list[str]:
        return sorted({sdir.parent.name for sdir, _, _ in self.items})


def channel_stats(ds: LatentDataset, key: str, max_items: int = 256,
                  phases: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std ``(C,)`` of ``key`` ("x" or "image") over up to ``max_items`` items; with
    ``phases`` > 0, ``(phases, C)``: the statistics of each phase index's items (up to ``max_items`` each; a
    phase without items, e.g. the reference phase in ref mode, gets mean 0 and std 1)."""
    if len(ds) == 0:
        raise ValueError("no latents to compute statistics from")
    if phases <= 0:
        return _stats(ds, key, list(range(len(ds))), max_items)
    rows = [[i for i, (_, _, pct) in enumerate(ds.items) if pct // 10 == p] for p in range(phases)]
    found = [_stats(ds, key, r, max_items) if r else None for r in rows]
    c = next(f[0].shape[0] for f in found if f is not None)
    mean = torch.stack([f[0] if f is not None else torch.zeros(c) for f in found])
    std = torch.stack([f[1] if f is not None else torch.ones(c) for f in found])
    return mean, std


def _stats(ds: LatentDataset, key: str, items: list[int], max_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``key`` over up to ``max_items`` of ``items`` (evenly spread)."""
    pick = np.asarray(items)[np.linspace(0, len(items) - 1, min(len(items), max_items)).round().astype(int)]
    s = s2 = None
    count = 0
    for i in pick:
        z = ds[int(i)][key].double()
        flat = z.reshape(z.shape[0], -1)
        s = flat.sum(1) if s is None else s + flat.sum(1)
        s2 = (flat**2).sum(1) if s2 is None else s2 + (flat**2).sum(1)
        count += flat.shape[1]
    mean = s / count
    std = torch.sqrt(torch.clamp(s2 / count - mean**2, min=1e-12))
    return mean.float(), std.float()


def image_deviation_stats(ds: LatentDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel-wise mean ``(Ci, Z, Y, X)`` of the reference image latents of ``ds``'s studies (one per
    study) and the per-channel std ``(Ci,)`` of their deviations from it (across patients).

    With a single study the std falls back to 1 (the deviation is then zero)."""
    seen: dict[Path, torch.Tensor] = {}
    for sdir, _, _ in ds.items:
        if sdir not in seen:
            seen[sdir] = torch.from_numpy(read_npy(sdir / f"image_{REFERENCE_PHASE:02d}.npy").astype(np.float64))
    if not seen:
        raise ValueError("no image latents to compute statistics from")
    stack = torch.stack(list(seen.values()))  # (N, Ci, Z, Y, X)
    mean = stack.mean(0)
    dev = (stack - mean).transpose(0, 1).reshape(stack.shape[1], -1)
    std = dev.pow(2).mean(1).sqrt() if len(seen) > 1 else torch.ones(stack.shape[1], dtype=torch.float64)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean.float(), std.float()


def anatomy_stats(ds: LatentDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``(F,)`` of the lung features of ``ds``'s studies (one value per study; a std below
    1e-6 of the feature's scale, e.g. a single study, falls back to 1)."""
    if not ds.features:
        sdir, why = ds.without_features or (ds.root, "no studies")
        raise ValueError(f"{sdir / STUDY_MARKER}: no lung features ({why}); rebuild the set with `respmotion "
                         "latents` from CTs with lungs, or train with model.anatomy_condition=false")
    studies = sorted({sdir for sdir, _, _ in ds.items})
    stack = torch.from_numpy(np.stack([ds.features[s] for s in studies]).astype(np.float64))
    mean = stack.mean(0)
    std = stack.std(0, unbiased=False) if len(studies) > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-6 * mean.abs().clamp(min=1.0), std, torch.ones_like(std))
    return mean.float(), std.float()
