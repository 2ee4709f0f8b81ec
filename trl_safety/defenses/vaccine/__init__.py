"""Vaccine: perturbation-aware alignment (alignment stage)."""

from ...registry import DefenseSpec, register_defense
from .vaccine_config import VaccineConfig
from .vaccine_trainer import VaccineTrainer


register_defense(
    DefenseSpec(
        name="vaccine",
        stage="alignment",
        config_class=VaccineConfig,
        trainer_class=VaccineTrainer,
        description="Perturbation-aware alignment: train on safety data under worst-case attention-output "
        "perturbations of radius rho.",
        bench_overrides={"rho": 2.0},  # the README default, pinned: ρ ≥ 4 breaks the toy task (docs/vaccine.md)
    )
)

__all__ = ["VaccineConfig", "VaccineTrainer"]
