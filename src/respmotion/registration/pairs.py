"""Which phase pairs to register, where their results go, sharding and resumption.

Pair kinds (both pull fields on the *fixed* phase's grid, in the layout's naming of ``gt/``):

* ``ref_XX``: fixed = phase XX, moving = the reference phase (default 00); ``phase_XX(p) = ref(p + u(p))``.
* ``step_XX``: fixed = the phase after XX, moving = phase XX (the research code's consecutive targets;
  ``step_90`` closes the cycle 90 -> 00).

``step_<ref>`` and ``ref_<ref+10>`` are the same registration; it is computed once and stored under both names.
Results live in ``<out>/<patient>/<study>/<name>.npz`` (+ ``<name>.json`` quality record); a pair is finished when
its ``.npz`` loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..io.layout import PHASES, StudyDir, next_phase

PAIR_KINDS = ("ref", "step", "both")


@dataclass(frozen=True)
class Pair:
    """One registration: ``moving`` phase pulled onto the ``fixed`` phase of ``study``, stored as ``names``."""

    study: StudyDir
    fixed: int
    moving: int
    names: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.study.key}/{self.names[0]}"

    def out_dir(self, out: str | os.PathLike) -> Path:
        return Path(out) / self.study.patient / self.study.study

    def paths(self, out: str | os.PathLike) -> list[Path]:
        return [self.out_dir(out) / f"{n}.npz" for n in self.names]


def study_pairs(study: StudyDir, kinds: str = "both", reference: int = 0) -> list[Pair]:
    """The unique registrations of one study (aliases merged), in a fixed order."""
    if kinds not in PAIR_KINDS:
        raise ValueError(f"pairs must be one of {PAIR_KINDS}, got {kinds!r}")
    if reference not in PHASES:
        raise ValueError(f"reference phase {reference} is not one of {PHASES}")
    wanted: dict[tuple[int, int], list[str]] = {}
    if kinds in ("ref", "both"):
        for k in PHASES:
            if k != reference:
                wanted.setdefault((k, reference), []).append(f"ref_{k:02d}")
    if kinds in ("step", "both"):
        for k in PHASES:
            wanted.setdefault((next_phase(k), k), []).append(f"step_{k:02d}")
    return [Pair(study, f, m, tuple(n)) for (f, m), n in wanted.items()]


def shard(pairs: list[Pair], rank: int, world_size: int) -> list[Pair]:
    """Round-robin share of ``pairs`` for ``rank`` (every pair goes to exactly one rank)."""
    return [p for i, p in enumerate(pairs) if i % world_size == rank]
