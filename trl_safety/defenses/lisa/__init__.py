"""Lisa (fine-tuning stage): Bi-State Optimization between alignment and user data with a proximal term."""

from ...registry import DefenseSpec, register_defense
from .lisa_config import LisaConfig
from .lisa_trainer import LisaTrainer


_CITATION = """\
@inproceedings{huang2024lisa,
    title        = {{Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning Attack}},
    author       = {Tiansheng Huang and Sihao Hu and Fatih Ilhan and Selim Furkan Tekin and Ling Liu},
    year         = 2024,
    booktitle    = {Advances in Neural Information Processing Systems 38, {NeurIPS} 2024},
}"""


register_defense(
    DefenseSpec(
        name="lisa",
        stage="fine-tuning",
        config_class=LisaConfig,
        trainer_class=LisaTrainer,
        title="Lisa",
        paper={
            "title": "Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning Attack",
            "id": "2405.18641",
            "citation": _CITATION,
        },
        description="Alternates alignment and user steps (K1/K2) with a proximal pull to the other state's weights.",
        # A toy run lasts a few hundred steps, not thousands: K1/K2 = 100/900 would spend the first 100 steps on
        # alignment data only and switch at most once. 10/90 keeps the paper's 1:9 allocation with several cycles.
        bench_overrides={"alignment_steps": 10, "finetune_steps": 90, "rho": 5.0},
        # no alignment steps and no proximal pull: every step is a plain user step
        neutral_overrides={"rho": 0.0, "alignment_steps": 0},
    )
)

__all__ = ["LisaConfig", "LisaTrainer"]
