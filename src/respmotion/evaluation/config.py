"""Settings of ``respmotion evaluate synthesis`` (loaded through :mod:`respmotion.config`; ``--config`` /
``key=value``): :class:`EvaluateSynthesisConfig`.

Cohort mode (``data``): the studies of the patients of ``split`` (split of ``split_ratios`` with
``split_seed``, :func:`respmotion.training.splits.split_patients`), or ``patients`` when given, are
evaluated by :func:`respmotion.evaluation.synthesis_eval.run_evaluation`.  Landmark mode (``ct`` and
``landmarks``): :func:`respmotion.evaluation.ct_landmarks.evaluate_ct_landmarks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..training.splits import SPLIT_RATIOS, SPLIT_SEED


@dataclass
class EvaluateSynthesisConfig:
    """``model`` as :class:`respmotion.synthesis.run.SynthesizeConfig`'s (``gt``: the phantom's ground truth);
    ``samples`` cycles per study; ``sampler``, ``steps``, ``delta_t`` empty or 0: the model's own."""

    data: str = ""
    ct: str = ""
    landmarks: str = ""
    model: str = ""
    out: str = "out/evaluation"
    patients: list[str] = field(default_factory=list)
    split: str = "test"
    split_ratios: tuple[float, float, float] = SPLIT_RATIOS
    split_seed: int = SPLIT_SEED
    samples: int = 1
    seed: int = 0
    device: str = "cpu"
    sampler: str = ""
    steps: int = 0
    delta_t: int = 0
