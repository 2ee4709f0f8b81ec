"""Antibody, alignment stage: flatness of the harmful loss with an adaptive weight plus a perturbed refusal loss."""

from ...registry import DefenseSpec, register_defense
from .antibody_align_config import AntibodyAlignConfig
from .antibody_align_trainer import AntibodyAlignTrainer


register_defense(
    DefenseSpec(
        name="antibody-align",
        stage="alignment",
        config_class=AntibodyAlignConfig,
        trainer_class=AntibodyAlignTrainer,
        description="Alignment in a flat harmful-loss region (adaptive λ) with a refusal loss at perturbed weights.",
        bench_overrides={"harmful_batch_size": 8},
    )
)

__all__ = ["AntibodyAlignConfig", "AntibodyAlignTrainer"]
