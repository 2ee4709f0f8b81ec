"""SafeMERGE (post-fine-tuning): merge the fine-tuned LoRA adapter with a safety adapter, layer by layer, where the
update leaves the alignment subspace."""

from ...registry import DefenseSpec, register_defense
from .safemerge_callback import SafeMERGECallback
from .safemerge_config import SafeMERGEConfig
from .safemerge_merge import SAFEMERGE_STATS_NAME, merge_factors, module_cosine, safemerge, select_and_merge


_CITATION = """\
@article{djuhera2025safemerge,
    title   = {{SafeMERGE: Preserving Safety Alignment in Fine-Tuned Large Language Models via Selective Layer-Wise Model Merging}},
    author  = {Aladin Djuhera and Swanand Ravindra Kadhe and Farhan Ahmed and Syed Zawad and Holger Boche},
    journal = {arXiv preprint arXiv:2503.17239},
    year    = {2025},
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
    """Registry entry point: SafeMERGE needs the base and aligned models and its safety adapter (config field)."""
    return safemerge(model, config, base_model=base_model, aligned_model=aligned_model, output_dir=output_dir)


register_defense(
    DefenseSpec(
        name="safemerge",
        stage="post-fine-tuning",
        config_class=SafeMERGEConfig,
        trainer_class=None,
        post_hoc=_post_hoc,
        title="SafeMERGE",
        paper={
            "title": "SafeMERGE: Preserving Safety Alignment in Fine-Tuned Large Language Models via Selective "
            "Layer-Wise Model Merging",
            "id": "2503.17239",
            "citation": _CITATION,
        },
        description="Post-fine-tuning merge of the LoRA update with a safety adapter where it leaves the alignment "
        "subspace (Djuhera et al.)",
        neutral_overrides={"threshold": -1.0},
        # the callback writes merged factors whose rank differs from the adapter's (SafeMERGECallback refuses it)
        unsupported_backends=("zero3",),
    )
)

__all__ = [
    "SAFEMERGE_STATS_NAME",
    "SafeMERGECallback",
    "SafeMERGEConfig",
    "merge_factors",
    "module_cosine",
    "safemerge",
    "select_and_merge",
]
