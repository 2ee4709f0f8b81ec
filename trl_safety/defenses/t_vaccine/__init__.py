"""T-Vaccine (Targeted Vaccine): layer-selective Vaccine (alignment stage)."""

from ...registry import DefenseSpec, register_defense
from .t_vaccine_config import TVaccineConfig
from .t_vaccine_trainer import TVaccineTrainer


_CITATION = """\
@article{liu2024targeted,
    title   = {{Targeted Vaccine: Safety Alignment for Large Language Models against Harmful Fine-Tuning via Layer-wise
               Perturbation}},
    author  = {Guozhi Liu and Weiwei Lin and Tiansheng Huang and Ruichao Mo and Qi Mu and Li Shen},
    journal = {arXiv preprint arXiv:2410.09760},
    year    = {2024}
}"""


register_defense(
    DefenseSpec(
        name="t-vaccine",
        stage="alignment",
        config_class=TVaccineConfig,
        trainer_class=TVaccineTrainer,
        title="T-Vaccine",
        paper={
            "title": "Targeted Vaccine: Safety Alignment for Large Language Models against Harmful Fine-Tuning via "
            "Layer-wise Perturbation",
            "id": "2410.09760",
            "citation": _CITATION,
        },
        description="Layer-selective Vaccine: perturb and train only layers sampled by their harmful-gradient norm.",
        bench_overrides={"rho": 3.0, "num_active_layers": 1, "resample_interval": 5, "rescore_interval": 20},
        neutral_overrides={"rho": 0.0},
    )
)

__all__ = ["TVaccineConfig", "TVaccineTrainer"]
