"""Antibody, alignment stage: flatness of the harmful loss with an adaptive weight plus a perturbed refusal loss."""

from ...registry import DefenseSpec, register_defense
from ..antibody import PAPER as ANTIBODY_PAPER
from .antibody_align_config import AntibodyAlignConfig
from .antibody_align_trainer import AntibodyAlignTrainer


register_defense(
    DefenseSpec(
        name="antibody-align",
        stage="alignment",
        config_class=AntibodyAlignConfig,
        trainer_class=AntibodyAlignTrainer,
        title="Antibody",
        paper=ANTIBODY_PAPER,
        description="Alignment in a flat harmful-loss region (adaptive λ) with a refusal loss at perturbed weights.",
        bench_overrides={"harmful_batch_size": 8},
        # a fixed λ of 0 (no flatness term) and no perturbed refusal loss
        neutral_overrides={"fixed_lambda": 0.0, "lambda2": 0.0},
    )
)

__all__ = ["AntibodyAlignConfig", "AntibodyAlignTrainer"]
