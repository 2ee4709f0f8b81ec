"""T-Vaccine (Targeted Vaccine): layer-selective Vaccine (alignment stage)."""

from ...registry import DefenseSpec, register_defense
from .t_vaccine_config import TVaccineConfig
from .t_vaccine_trainer import TVaccineTrainer


register_defense(
    DefenseSpec(
        name="t-vaccine",
        stage="alignment",
        config_class=TVaccineConfig,
        trainer_class=TVaccineTrainer,
        description="Layer-selective Vaccine: perturb and train only layers sampled by their harmful-gradient norm.",
        bench_overrides={"rho": 3.0, "num_active_layers": 1, "resample_interval": 5, "rescore_interval": 20},
    )
)

__all__ = ["TVaccineConfig", "TVaccineTrainer"]
