"""Booster (alignment stage): attenuate the harmful-loss drop of a simulated harmful fine-tuning step."""

from ...registry import DefenseSpec, register_defense
from .booster_config import BoosterConfig
from .booster_trainer import BoosterTrainer


register_defense(
    DefenseSpec(
        name="booster",
        stage="alignment",
        config_class=BoosterConfig,
        trainer_class=BoosterTrainer,
        unsupported_backends=("zero3",),
        description="Alignment with a penalty on the harmful-loss drop after a simulated harmful step (3 passes).",
        # The toy model's harmful gradients are much larger than a 7B LoRA's, so a larger normalised step is needed
        # to reach a region where h changes measurably; λ=5 as in the paper.
        bench_overrides={"harmful_batch_size": 8},
    )
)

__all__ = ["BoosterConfig", "BoosterTrainer"]
