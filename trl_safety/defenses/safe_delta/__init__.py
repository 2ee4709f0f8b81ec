"""Safe Delta (post-fine-tuning): keep the fine-tuning deltas that fit a safety budget, compensate the rest."""

from ...registry import DefenseSpec, register_defense
from .safe_delta_callback import SafeDeltaCallback
from .safe_delta_config import SafeDeltaConfig
from .safe_delta_select import SAFE_DELTA_STATS_NAME, safe_delta, safe_delta_matrix


_CITATION = """\
@inproceedings{lu2025safedelta,
    title     = {{Safe Delta: Consistently Preserving Safety when Fine-Tuning LLMs on Diverse Datasets}},
    author    = {Ning Lu and Shengcai Liu and Jiahao Wu and Weiyu Chen and Zhirui Zhang and Yew-Soon Ong and Qi Wang and Ke Tang},
    booktitle = {Forty-second International Conference on Machine Learning},
    year      = {2025},
}"""


def _post_hoc(
    model,
    config,
    *,
    alignment_dataset=None,
    harmful_dataset=None,
    processing_class=None,
    base_model=None,
    aligned_model=None,
    output_dir=None,
):
    """Registry entry point: `model` is the fine-tuned model, `aligned_model` the model it was fine-tuned from, the
    safety calibration set `alignment_dataset` (the bench's harmful → refusal rows) or `config.alignment_dataset_name`
    (the CLI's `--alignment_dataset_name`). Harmful answers are not a safety set, and no base model is used."""
    return safe_delta(
        model,
        alignment_dataset,
        config,
        aligned_model=aligned_model,
        processing_class=processing_class,
        output_dir=output_dir,
    )


register_defense(
    DefenseSpec(
        name="safe-delta",
        stage="post-fine-tuning",
        config_class=SafeDeltaConfig,
        trainer_class=None,
        post_hoc=_post_hoc,
        title="Safe Delta",
        paper={
            "title": "Safe Delta: Consistently Preserving Safety when Fine-Tuning LLMs on Diverse Datasets",
            "id": "2505.12038",
            "citation": _CITATION,
        },
        description="Post-fine-tuning selection of the deltas that fit a safety budget, with OBS compensation (Lu "
        "et al.)",
        neutral_overrides={"scale": float("inf"), "exclude_ratio": 0.0, "non_linear_params": "finetuned"},
        # whole weight matrices and Hessians are read layer by layer (SafeDeltaCallback refuses partitioned weights)
        unsupported_backends=("zero3",),
        # the budget's normalisation dimension (official 4096, Llama-2-7B's hidden size) and block (half of it),
        # scaled to the toy model's hidden size 64 by the same rule (docs/safe_delta.md, "In the bench")
        bench_overrides={"budget_ref_dim": 64, "block_size": 32},
    )
)

__all__ = ["SAFE_DELTA_STATS_NAME", "SafeDeltaCallback", "SafeDeltaConfig", "safe_delta", "safe_delta_matrix"]
