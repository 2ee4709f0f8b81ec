"""Antibody, fine-tuning stage: per-sample likelihood-ratio weighting (refusal vs answer) inside each batch."""

from ...registry import DefenseSpec, register_defense
from .antibody_config import AntibodyConfig
from .antibody_trainer import AntibodyTrainer


register_defense(
    DefenseSpec(
        name="antibody",
        stage="fine-tuning",
        config_class=AntibodyConfig,
        trainer_class=AntibodyTrainer,
        description="Weights each sample of a batch by softmax((NLL of a refusal - NLL of its answer) / tau).",
        # The official τ=1 and batch size 16 carry over: the weights are a softmax over the micro-batch, so the
        # bench's batch size (not the model scale) sets their effect. Nothing to rescale.
        bench_overrides={},
    )
)

__all__ = ["AntibodyConfig", "AntibodyTrainer"]
