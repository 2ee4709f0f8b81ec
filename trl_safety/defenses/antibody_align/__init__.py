"""Antibody, alignment stage: flatness of the harmful loss with an adaptive weight plus a perturbed refusal loss."""

from ...registry import DefenseSpec, register_defense
from .antibody_align_config import AntibodyAlignConfig
from .antibody_align_trainer import AntibodyAlignTrainer


_CITATION = """\
@inproceedings{nguyen2026antibody,
    title        = {{Antibody: Strengthening Defense Against Harmful Fine-Tuning for Large Language Models via Attenuating Harmful Gradient Influence}},
    author       = {Quoc Minh Nguyen and Trung Le and Jing Wu and Anh Tuan Bui and Mehrtash Harandi},
    year         = 2026,
    booktitle    = {The Fourteenth International Conference on Learning Representations},
}"""


register_defense(
    DefenseSpec(
        name="antibody-align",
        stage="alignment",
        config_class=AntibodyAlignConfig,
        trainer_class=AntibodyAlignTrainer,
        title="Antibody",
        paper={
            "title": "Antibody: Strengthening Defense Against Harmful Fine-Tuning for Large Language Models via "
            "Attenuating Harmful Gradient Influence",
            "id": "2603.00498",
            "citation": _CITATION,
        },
        description="Alignment in a flat harmful-loss region (adaptive λ) with a refusal loss at perturbed weights.",
        bench_overrides={"harmful_batch_size": 8},
        # a fixed λ of 0 (no flatness term) and no perturbed refusal loss
        neutral_overrides={"fixed_lambda": 0.0, "lambda2": 0.0},
    )
)

__all__ = ["AntibodyAlignConfig", "AntibodyAlignTrainer"]
