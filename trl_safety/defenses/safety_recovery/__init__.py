"""Safety-recovery data augmentation: refuse after the first tokens of a harmful answer (alignment stage)."""

from ...registry import DefenseSpec, register_defense
from .safety_recovery_config import SafetyRecoveryConfig
from .safety_recovery_trainer import SafetyRecoveryTrainer


_CITATION = """\
@inproceedings{qi2025safety,
    title     = {{Safety Alignment Should Be Made More Than Just a Few Tokens Deep}},
    author    = {Xiangyu Qi and Ashwinee Panda and Kaifeng Lyu and Xiao Ma and Subhrajit Roy and Ahmad Beirami and
                 Prateek Mittal and Peter Henderson},
    booktitle = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
    year      = {2025},
    eprint    = {2406.05946},
    archivePrefix = {arXiv}
}"""


register_defense(
    DefenseSpec(
        name="safety-recovery",
        stage="alignment",
        config_class=SafetyRecoveryConfig,
        trainer_class=SafetyRecoveryTrainer,
        title="Safety-recovery data augmentation",
        paper={
            "title": "Safety Alignment Should Be Made More Than Just a Few Tokens Deep",
            "id": "2406.05946",
            "citation": _CITATION,
        },
        description="Alignment on harmful prompt + first k harmful-answer tokens -> refusal (loss on the refusal), "
        "mixed with utility anchor data in one token-mean loss.",
        bench_overrides={},
        paired_data=True,
        neutral_overrides={"augment_prob": 0.0, "anchor_batch_size": 0},
    )
)

__all__ = ["SafetyRecoveryConfig", "SafetyRecoveryTrainer"]
