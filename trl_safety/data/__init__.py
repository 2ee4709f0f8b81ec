"""Dataset loading, adapters to TRL formats, templates, and harmful mixing."""

from .adapters import (
    AGNEWS_INSTRUCTION,
    AGNEWS_LABELS,
    BEAVERTAILS_ID,
    GSM8K_ANSWER_MARKER,
    REPNOISE_REFUSALS_ID,
    SST2_INSTRUCTION,
    SST2_LABELS,
    TASK_TEST_SPLITS,
    agnews_dataset,
    beavertails_dataset,
    beavertails_eval_prompts,
    gsm8k_dataset,
    load_task_dataset,
    parse_adapter_options,
    refusal_answer,
    repnoise_refusal_dataset,
    select_indices,
    sst2_dataset,
)
from .loading import get_dataset_adapter, load_named_dataset, load_role_dataset, register_dataset_adapter
from .mixing import mix_harmful, num_harmful
from .templates import alpaca_prompt, apply_template, prompt_formatter


__all__ = [
    "AGNEWS_INSTRUCTION",
    "AGNEWS_LABELS",
    "BEAVERTAILS_ID",
    "GSM8K_ANSWER_MARKER",
    "REPNOISE_REFUSALS_ID",
    "SST2_INSTRUCTION",
    "SST2_LABELS",
    "TASK_TEST_SPLITS",
    "agnews_dataset",
    "alpaca_prompt",
    "apply_template",
    "beavertails_dataset",
    "beavertails_eval_prompts",
    "get_dataset_adapter",
    "gsm8k_dataset",
    "load_named_dataset",
    "load_role_dataset",
    "load_task_dataset",
    "mix_harmful",
    "num_harmful",
    "parse_adapter_options",
    "prompt_formatter",
    "refusal_answer",
    "register_dataset_adapter",
    "repnoise_refusal_dataset",
    "select_indices",
    "sst2_dataset",
]
