"""Vaccine: perturbation-aware alignment (alignment stage)."""

from ...registry import DefenseSpec, register_defense
from .vaccine_config import VaccineConfig
from .vaccine_trainer import VaccineTrainer


_CITATION = """\
@inproceedings{huang2024vaccine,
    title     = {{Vaccine: Perturbation-aware Alignment for Large Language Models against Harmful Fine-tuning Attack}},
    author    = {Tiansheng Huang and Sihao Hu and Ling Liu},
    booktitle = {Advances in Neural Information Processing Systems},
    year      = {2024},
    eprint    = {2402.01109},
    archivePrefix = {arXiv}
}"""


register_defense(
    DefenseSpec(
        name="vaccine",
        stage="alignment",
        config_class=VaccineConfig,
        trainer_class=VaccineTrainer,
        title="Vaccine",
        paper={
            "title": "Vaccine: Perturbation-aware Alignment for Large Language Models against Harmful Fine-tuning "
            "Attack",
            "id": "2402.01109",
            "citation": _CITATION,
        },
        description="Perturbation-aware alignment: train on safety data under worst-case attention-output "
        "perturbations of radius rho.",
        bench_overrides={"rho": 2.0},  # the README default, pinned: ρ ≥ 4 breaks the toy task (docs/vaccine.md)
        neutral_overrides={"rho": 0.0},
    )
)

__all__ = ["VaccineConfig", "VaccineTrainer"]
