"""Settings of ``respmotion evaluate synthesis`` (loaded through :mod:`respmotion.config`; ``--config`` /
``key=value``): :class:`EvaluateSynthesisConfig`.

Cohort mode (``data``): the studies of the patients of ``split`` (cut by ``patient_split``, ratios and seed:
:class:`respmotion.training.splits.SplitSettings`), or ``patients`` when given, are
evaluated by :func:`respmotion.evaluation.synthesis_eval.run_evaluation`.  Landmark mode (``ct`` and
``landmarks``): :func:`respmotion.evaluation.ct_landmarks.evaluate_ct_landmarks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..training.splits import SPLIT_RENAMED, SplitSettings


@dataclass
class EvaluateSynthesisConfig:
    """``model`` as :class:`respmotion.synthesis.run.SynthesizeConfig`'s (``gt``: the phantom's ground truth);
    ``samples`` cycles per study (K: a generator is judged by K samples, their mean, energy score and spread,
    :mod:`respmotion.evaluation.ensemble`; deterministic models give K equal cycles); ``sampler``, ``steps``,
    ``delta_t`` None: the model's own; ``device`` as :func:`respmotion.runtime.resolve_device`, ``precision`` as
    :func:`respmotion.runtime.resolve_precision`."""

    data: str = ""
    ct: str = ""
    landmarks: str = ""
    model: str = ""
    out: str = "out/evaluation"
    patients: list[str] = field(default_factory=list)
    split: str = "test"
    patient_split: SplitSettings = field(default_factory=SplitSettings)
    samples: int = 8
    seed: int = 0
    device: str = "auto"
    sampler: str | None = None
    steps: int | None = None
    delta_t: int | None = None
    precision: str = "fp32"

    RENAMED: ClassVar[dict[str, str]] = SPLIT_RENAMED
