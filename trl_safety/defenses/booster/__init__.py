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
        description="Alignment with a penalty on the harmful-loss drop after a simulated harmful step (3 passes).",
        # A harmful batch of the toy world's size; λ and α keep the paper's values (docs/booster.md)
        bench_overrides={"harmful_batch_size": 8},
    )
)

__all__ = ["BoosterConfig", "BoosterTrainer"]
