"""LoX (alignment stage, training-free): extrapolate the aligned model along the top-k subspace of its alignment
update before user fine-tuning."""

from ...registry import DefenseSpec, register_defense
from .lox_callback import LoXCallback
from .lox_config import LoXConfig
from .lox_extrapolate import LOX_STATS_NAME, extrapolate_lora_factors, lox_extrapolate


_CITATION = """\
@inproceedings{perin2025lox,
    title     = {{LoX: Low-Rank Extrapolation Robustifies LLM Safety Against Fine-tuning}},
    author    = {Gabriel J. Perin and Runjin Chen and Xuxi Chen and Nina S. T. Hirata and Zhangyang Wang and Junyuan Hong},
    booktitle = {Conference on Language Modeling},
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
    """Registry entry point: `model` is the aligned model (LoRA alignment adapter, or dense with `base_model`)."""
    return lox_extrapolate(model, config, base_model=base_model, output_dir=output_dir)


register_defense(
    DefenseSpec(
        name="lox",
        stage="alignment",
        config_class=LoXConfig,
        trainer_class=None,
        post_hoc=_post_hoc,
        title="LoX",
        paper={
            "title": "LoX: Low-Rank Extrapolation Robustifies LLM Safety Against Fine-tuning",
            "id": "2506.15606",
            "citation": _CITATION,
        },
        description="Training-free extrapolation of the aligned model along its low-rank alignment update (Perin et al.)",
        neutral_overrides={"alpha": 0.0},
    )
)

__all__ = ["LOX_STATS_NAME", "LoXCallback", "LoXConfig", "extrapolate_lora_factors", "lox_extrapolate"]
