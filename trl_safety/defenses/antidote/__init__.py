"""Antidote (post-fine-tuning): one-shot Wanda-style pruning of the weights that produce harmful answers."""

from ...registry import DefenseSpec, register_defense
from .antidote_callback import AntidoteCallback
from .antidote_config import AntidoteConfig
from .antidote_prune import ANTIDOTE_STATS_NAME, antidote_prune


_CITATION = """\
@inproceedings{huang2025antidote,
    title     = {{Antidote: Post-fine-tuning Safety Alignment for Large Language Models against Harmful Fine-tuning}},
    author    = {Tiansheng Huang and Gautam Bhattacharya and Pratik Joshi and Josh Kimball and Ling Liu},
    booktitle = {Forty-second International Conference on Machine Learning},
    year      = {2025},
}"""


def _post_hoc(
    model,
    config,
    *,
    harmful_dataset=None,
    processing_class=None,
    base_model=None,
    aligned_model=None,
    output_dir=None,
):
    """Registry entry point: Antidote needs only the harmful data (base and aligned models are ignored)."""
    return antidote_prune(model, harmful_dataset, config, processing_class=processing_class, output_dir=output_dir)


register_defense(
    DefenseSpec(
        name="antidote",
        stage="post-fine-tuning",
        config_class=AntidoteConfig,
        trainer_class=None,
        post_hoc=_post_hoc,
        title="Antidote",
        paper={
            "title": "Antidote: Post-fine-tuning Safety Alignment for Large Language Models against Harmful "
            "Fine-tuning",
            "id": "2408.09600",
            "citation": _CITATION,
        },
        description="Post-fine-tuning Wanda pruning of the weights most important on harmful data (Huang et al.)",
        # the toy bench's fine-tuning adapter covers every linear layer: prune all of them, as the official code
        # prunes every module its (q/k/v) adapter trains
        bench_overrides={
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        },
        neutral_overrides={"prune_ratio": 0.0},
    )
)

__all__ = ["ANTIDOTE_STATS_NAME", "AntidoteCallback", "AntidoteConfig", "antidote_prune"]
