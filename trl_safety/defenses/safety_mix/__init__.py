"""Safety-data mixing baseline (Vlguard / SafeInstr): λ·CE on an alignment batch added to every user micro-batch."""

from ...registry import DefenseSpec, register_defense
from .safety_mix_config import SafetyMixConfig
from .safety_mix_trainer import SafetyMixTrainer


_CITATION = """\
@inproceedings{zong2024safety,
    title     = {{Safety Fine-Tuning at (Almost) No Cost: A Baseline for Vision Large Language Models}},
    author    = {Yongshuo Zong and Ondrej Bohdal and Tingyang Yu and Yongxin Yang and Timothy Hospedales},
    year      = 2024,
    booktitle = {Proceedings of the 41st International Conference on Machine Learning, {ICML} 2024},
}"""


register_defense(
    DefenseSpec(
        name="safety-mix",
        stage="fine-tuning",
        config_class=SafetyMixConfig,
        trainer_class=SafetyMixTrainer,
        title="Safety-data mixing (Vlguard / SafeInstr)",
        paper={
            "title": "Safety Fine-Tuning at (Almost) No Cost: A Baseline for Vision Large Language Models",
            "id": "2402.02207",
            "citation": _CITATION,
        },
        description="Adds lambda * CE on a batch of alignment (refusal) data to every user micro-batch.",
        # λ=1 and batch 4 carry over unchanged: the term is a token-mean CE like the user loss, so its scale does not
        # depend on the model size.
        bench_overrides={},
        neutral_overrides={"safety_weight": 0.0},
    )
)

__all__ = ["SafetyMixConfig", "SafetyMixTrainer"]
