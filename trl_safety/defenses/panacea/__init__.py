"""Panacea: fine-tuning with an adversarial weight perturbation that is added to the weights after training."""

from ...registry import DefenseSpec, register_defense
from .panacea_config import PanaceaConfig
from .panacea_trainer import PanaceaTrainer


_CITATION = """\
@inproceedings{wang2025panacea,
    title        = {{Panacea: Mitigating Harmful Fine-tuning for Large Language Models via Post-fine-tuning Perturbation}},
    author       = {Yibo Wang and Tiansheng Huang and Li Shen and Huanjin Yao and Haotian Luo and Rui Liu and Naiqiang Tan and Jiaxing Huang and Dacheng Tao},
    year         = 2025,
    booktitle    = {Advances in Neural Information Processing Systems},
}"""


register_defense(
    DefenseSpec(
        name="panacea",
        stage="fine-tuning",
        config_class=PanaceaConfig,
        trainer_class=PanaceaTrainer,
        title="Panacea",
        paper={
            "title": "Panacea: Mitigating Harmful Fine-tuning for Large Language Models via Post-fine-tuning "
            "Perturbation",
            "id": "2501.18100",
            "citation": _CITATION,
        },
        description="Fine-tuning with a learned harmful-loss-raising weight perturbation ε, added after training.",
        bench_overrides={"harmful_batch_size": 8},
        # no perturbation term, and no ε added after training
        neutral_overrides={"lamb": 0.0, "add_eps": False},
    )
)

__all__ = ["PanaceaConfig", "PanaceaTrainer"]
