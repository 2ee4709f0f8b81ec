"""Panacea: fine-tuning with an adversarial weight perturbation that is added to the weights after training."""

from ...registry import DefenseSpec, register_defense
from .panacea_config import PanaceaConfig
from .panacea_trainer import PanaceaTrainer


register_defense(
    DefenseSpec(
        name="panacea",
        stage="fine-tuning",
        config_class=PanaceaConfig,
        trainer_class=PanaceaTrainer,
        description="Fine-tuning with a learned harmful-loss-raising weight perturbation ε, added after training.",
        bench_overrides={"harmful_batch_size": 8},
    )
)

__all__ = ["PanaceaConfig", "PanaceaTrainer"]
