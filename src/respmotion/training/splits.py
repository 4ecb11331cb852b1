"""Patient-level train/val/test split with a fixed seed: no patient is in two splits.

The one place of the split's settings (:class:`SplitSettings`, the ``patient_split`` section of every
config that cuts a cohort, defaults :data:`SPLIT_RATIOS`, :data:`SPLIT_SEED`), of cutting a
cohort (:func:`split_patients`, :func:`split_cohort`) and of "the studies of split X"
(:meth:`Split.studies`).  Use::

    split = split_cohort("data/cohort")             # 0.8 / 0.1 / 0.1 of the patients, seed 42
    test = split.studies("data/cohort", "test")     # their complete studies, sorted
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..io.layout import StudyDir, iter_studies, list_patients

#: train, val, test fractions of the patients (the research code's 80/10/10)
SPLIT_RATIOS: tuple[float, float, float] = (0.8, 0.1, 0.1)
#: seed of the shuffle that cuts the patients
SPLIT_SEED = 42
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class SplitSettings:
    """How a cohort's patients are cut: ``ratios`` (train, val, test fractions) and the shuffle's ``seed``."""

    ratios: tuple[float, float, float] = SPLIT_RATIOS
    seed: int = SPLIT_SEED

    def cut(self, patients: Sequence[str]) -> "Split":
        """:func:`split_patients` of ``patients`` with these settings."""
        return split_patients(patients, self.ratios, self.seed)


#: the keys configs saved before ``patient_split`` was one section (their ``RENAMED``, :mod:`respmotion.config`)
SPLIT_RENAMED = {"split_ratios": "patient_split.ratios", "split_seed": "patient_split.seed"}


@dataclass(frozen=True)
class Split:
    """Sorted patient ids of each split."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def get(self, name: str) -> tuple[str, ...]:
        if name not in SPLIT_NAMES:
            raise ValueError(f"split must be train, val or test, got {name!r}")
        return getattr(self, name)

    def studies(self, root: str | os.PathLike, name: str) -> list[StudyDir]:
        """The complete studies under ``root`` of the patients of split ``name`` (train, val, test), sorted."""
        return studies_of(root, self.get(name))

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_dict(cls, d: dict[str, Sequence[str]]) -> "Split":
        return cls(*(tuple(sorted(d.get(k, ()))) for k in SPLIT_NAMES))


def studies_of(root: str | os.PathLike, patients: Sequence[str]) -> list[StudyDir]:
    """Complete studies of ``patients`` under ``root``, sorted."""
    wanted = set(patients)
    return [s for s in iter_studies(root) if s.patient in wanted]


def split_cohort(root: str | os.PathLike, ratios: Sequence[float] = SPLIT_RATIOS, seed: int = SPLIT_SEED) -> Split:
    """:func:`split_patients` of the patients with a complete study under ``root``; an error when there are none."""
    patients = list_patients(root)
    if not patients:
        raise ValueError(f"{root}: no studies to train on (no complete study with a study.json)")
    return split_patients(patients, ratios, seed)


def split_patients(patients: Sequence[str], ratios: Sequence[float] = SPLIT_RATIOS, seed: int = SPLIT_SEED) -> Split:
    """Shuffle the sorted patient ids with ``seed`` and cut them by ``ratios`` (train, val, test).

    Counts are rounded; a split with a positive ratio gets at least one patient when there are
    enough patients for every such split to have one, and train always keeps at least one.
    The result depends only on the set of ids, the ratios and the seed.
    """
    ids = sorted(set(patients))
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers (train, val, test), got {list(ratios)}")
    if not ids:
        raise ValueError("no patients to split")
    r = np.asarray(ratios, dtype=float) / float(sum(ratios))
    n = len(ids)
    wanted = [i for i in range(3) if r[i] > 0]
    counts = [int(round(n * x)) for x in r]
    if n >= len(wanted):
        for i in wanted:
            counts[i] = max(counts[i], 1)
    counts[0] = max(1, n - counts[1] - counts[2])
    while sum(counts) > n:  # trim the largest of val/test
        j = 1 if counts[1] >= counts[2] else 2
        counts[j] -= 1
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    a, b = counts[0], counts[0] + counts[1]
    return Split(tuple(sorted(shuffled[:a])), tuple(sorted(shuffled[a:b])), tuple(sorted(shuffled[b:])))
