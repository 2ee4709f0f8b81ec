"""SafeLoRA (post-fine-tuning): project the least aligned LoRA updates onto the alignment subspace."""

from ...registry import DefenseSpec, register_defense
from .safelora_callback import SafeLoRACallback
from .safelora_config import SafeLoRAConfig
from .safelora_project import SAFELORA_STATS_NAME, alignment_projection, build_aligned_model, safelora_project


_CITATION = """\
@inproceedings{hsu2024safelora,
    title     = {{Safe LoRA: the Silver Lining of Reducing Safety Risks when Finetuning Large Language Models}},
    author    = {Chia-Yi Hsu and Yu-Lin Tsai and Chih-Hsun Lin and Pin-Yu Chen and Chia-Mu Yu and Chun-Ying Huang},
    booktitle = {Advances in Neural Information Processing Systems},
    year      = {2024},
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
    """Registry entry point: SafeLoRA needs the base and aligned models (the harmful data is ignored)."""
    return safelora_project(model, config, base_model=base_model, aligned_model=aligned_model, output_dir=output_dir)


register_defense(
    DefenseSpec(
        name="safelora",
        stage="post-fine-tuning",
        config_class=SafeLoRAConfig,
        trainer_class=None,
        post_hoc=_post_hoc,
        title="SafeLoRA",
        paper={
            "title": "Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning Large Language Models",
            "id": "2405.16833",
            "citation": _CITATION,
        },
        description="Post-fine-tuning projection of LoRA updates onto the alignment subspace (Hsu et al.)",
        neutral_overrides={"num_proj_layers": 0},
    )
)

__all__ = [
    "SAFELORA_STATS_NAME",
    "SafeLoRACallback",
    "SafeLoRAConfig",
    "alignment_projection",
    "build_aligned_model",
    "safelora_project",
]
