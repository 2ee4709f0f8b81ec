"""RepNoise: representation noising (alignment-stage baseline)."""

from ...registry import DefenseSpec, register_defense
from .repnoise_config import RepNoiseConfig
from .repnoise_trainer import RepNoiseTrainer


register_defense(
    DefenseSpec(
        name="repnoise",
        stage="alignment",
        config_class=RepNoiseConfig,
        trainer_class=RepNoiseTrainer,
        description="Representation noising: refuse on paired data while pushing harmful representations to noise "
        "and ascending the harmful loss.",
        bench_overrides={"alpha": 0.1, "beta": 0.001},
        paired_data=True,
    )
)

__all__ = ["RepNoiseConfig", "RepNoiseTrainer"]
