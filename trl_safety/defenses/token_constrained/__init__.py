"""Token-wise constrained fine-tuning: SFT with per-token weights that hold the first response tokens near the
aligned starting model (fine-tuning stage)."""

from ...registry import DefenseSpec, register_defense
from .token_constrained_config import TokenConstrainedConfig
from .token_constrained_trainer import TokenConstrainedTrainer


_CITATION = """\
@inproceedings{qi2025safety,
    title     = {{Safety Alignment Should be Made More Than Just a Few Tokens Deep}},
    author    = {Xiangyu Qi and Ashwinee Panda and Kaifeng Lyu and Xiao Ma and Subhrajit Roy and Ahmad Beirami and
                 Prateek Mittal and Peter Henderson},
    year      = 2025,
    booktitle = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
}"""


register_defense(
    DefenseSpec(
        name="token-constrained",
        stage="fine-tuning",
        config_class=TokenConstrainedConfig,
        trainer_class=TokenConstrainedTrainer,
        title="Token-wise constrained fine-tuning",
        paper={
            "title": "Safety Alignment Should be Made More Than Just a Few Tokens Deep",
            "id": "2406.05946",
            "citation": _CITATION,
        },
        description="SFT with per-token weights 2*sigmoid(-beta_t*log-ratio) against the starting model, strong on the "
        "first response tokens.",
        bench_overrides={},
        neutral_overrides={"beta": 0.0},
    )
)

__all__ = ["TokenConstrainedConfig", "TokenConstrainedTrainer"]
