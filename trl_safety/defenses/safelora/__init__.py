"""SafeLoRA (post-fine-tuning): project the least aligned LoRA updates onto the alignment subspace."""

from ...registry import DefenseSpec, register_defense
from .safelora_callback import SafeLoRACallback
from .safelora_config import SafeLoRAConfig
from .safelora_project import SAFELORA_STATS_NAME, alignment_projection, build_aligned_model, safelora_project


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
        description="Post-fine-tuning projection of LoRA updates onto the alignment subspace (Hsu et al.)",
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
