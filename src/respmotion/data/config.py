"""Settings of the data stage's commands (loaded through :mod:`respmotion.config`; ``--config`` / ``key=value``).

:class:`PhantomConfig`: ``respmotion phantom`` (:func:`respmotion.data.phantom.write_cohort`).
:class:`ImportConfig`: ``respmotion data import`` (:func:`respmotion.data.importer.import_ct`).
The other data commands' settings live beside their code: :class:`respmotion.data.idc.FetchConfig`,
:class:`respmotion.data.prepare.PrepareConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PhantomConfig:
    """A synthetic cohort: ``patients`` patients of one study each, volumes of ``shape`` (z, y, x) voxels."""

    out: str = "out/phantom"
    patients: int = 4
    seed: int = 0
    shape: tuple[int, int, int] = (50, 256, 256)
    noise_hu: float = 10.0
    workers: int = 1  # patients written in parallel processes (each patient's phases already use threads)
    phase_curve: str = "patient"  # "patient": each its own breathing curve; "population": all the reference's curve

    def __post_init__(self) -> None:
        if self.patients is not None and self.patients < 1:
            raise ValueError(f"patients must be >= 1, got {self.patients}")
        if self.noise_hu is not None and not self.noise_hu >= 0:
            raise ValueError(f"noise_hu must be >= 0 HU (a standard deviation), got {self.noise_hu}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass
class ImportConfig:
    """``respmotion data import`` settings."""

    shape: tuple[int, int, int] | None = None  # resample to (z, y, x) keeping the field of view; None = as is
    series: str | None = None  # SeriesInstanceUID when a DICOM folder holds several series
    phase: float | None = None  # or pick the series by respiratory phase (percent)
