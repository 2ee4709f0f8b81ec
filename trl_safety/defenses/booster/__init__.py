"""Booster (alignment stage): attenuate the harmful-loss drop of a simulated harmful fine-tuning step."""

from ...registry import DefenseSpec, register_defense
from .booster_config import BoosterConfig
from .booster_trainer import BoosterTrainer


_CITATION = """\
@inproceedings{huang2025booster,
    title        = {{Booster: Tackling Harmful Fine-tuning for Large Language Models via Attenuating Harmful Perturbation}},
    author       = {Tiansheng Huang and Sihao Hu and Fatih Ilhan and Selim Furkan Tekin and Ling Liu},
    year         = 2025,
    booktitle    = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
}"""


register_defense(
    DefenseSpec(
        name="booster",
        stage="alignment",
        config_class=BoosterConfig,
        trainer_class=BoosterTrainer,
        title="Booster",
        paper={
            "title": "Booster: Tackling Harmful Fine-tuning for Large Language Models via Attenuating Harmful "
            "Perturbation",
            "id": "2409.01586",
            "citation": _CITATION,
        },
        description="Alignment with a penalty on the harmful-loss drop after a simulated harmful step (3 passes).",
        # A harmful batch of the toy world's size; λ and α keep the paper's values (docs/booster.md)
        bench_overrides={"harmful_batch_size": 8},
        neutral_overrides={"lamb": 0.0},
    )
)

__all__ = ["BoosterConfig", "BoosterTrainer"]
