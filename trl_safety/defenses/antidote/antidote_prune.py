"""Antidote: after fine-tuning, zero the weights that matter most for producing harmful answers.

Algorithm (docs/design/algorithms.md §4.1, the official `prune_wanda_outlier`):

1. Run the harmful re-alignment set through the fine-tuned model once, in eval mode, recording for every scored
   linear layer ‖X_j‖ = sqrt(mean over samples of Σ_tokens x_j²) per input feature j. For a LoRA adapter the scored
   layers are `lora_A` (input: the hidden state) and `lora_B` (input: `lora_A(x)`).
2. Score every weight S_ij = |W_ij| · ‖X_j‖ (Wanda).
3. In each output row, mark the top α fraction of scores (sort ascending, keep the lowest `int(cols·(1−α))`).
4. Zero the marked weights: w̃ = (1 − m) ⊙ w.

The official code replays the network layer by layer from captured layer-0 inputs with *unpruned* weights, which is
the same as one ordinary forward with hooks (pruning happens after all statistics are collected); the hooks version
also works on current transformers (rotary embeddings) and under DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from ...core.config import check_defense_fields
from ...core.distributed import gathered
from ...core.hooks import input_statistics
from ...core.layers import check_decoder_only, find_modules, unwrap_model
from .antidote_config import AntidoteConfig


logger = logging.getLogger(__name__)

ANTIDOTE_STATS_NAME = "antidote_mask_stats.json"


# ------------------------------------------------------------------------------------------------------ targets
def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft not installed: no adapter can exist
        return False
    return isinstance(module, LoraLayer)


def find_antidote_targets(model: nn.Module, config: AntidoteConfig) -> tuple[str, list[tuple[str, nn.Linear]]]:
    """The linear layers whose weights Antidote scores and prunes, by qualified parameter name.

    Returns `("adapter" | "weights", [(parameter_name, linear), ...])`. In adapter mode the list holds the `lora_A`
    and `lora_B` linears of every active adapter inside the targeted modules (modules without the adapter are
    skipped); in weights mode the targeted `nn.Linear` modules themselves (the `base_layer` of a LoRA layer).
    """
    base = unwrap_model(model)
    matched = [
        (name, module)
        for name, module in find_modules(base, config.target_modules)
        # A regex may also match the inner pieces of a LoRA layer; the LoRA layer itself stands for them
        if not any(part in name.split(".") for part in ("base_layer", "lora_A", "lora_B"))
    ]
    has_adapter = any(_is_lora_layer(module) for module in base.modules())
    mode = config.prune_target
    if mode == "auto":
        mode = "adapter" if has_adapter else "weights"

    targets: list[tuple[str, nn.Linear]] = []
    skipped = []
    for name, module in matched:
        if mode == "adapter":
            if not _is_lora_layer(module):
                skipped.append(name)
                continue
            if getattr(module, "merged", False):
                raise ValueError(
                    f"The LoRA adapter of {name} is merged into the base weights, so pruning its factors would not "
                    "change the model. Unmerge it (`model.unmerge_adapter()`) or prune the merged weights with "
                    "`prune_target='weights'` on the merged model."
                )
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if not adapters:
                skipped.append(name)
            for adapter in adapters:
                for factor in ("lora_A", "lora_B"):
                    linear = getattr(module, factor)[adapter]
                    if not isinstance(linear, nn.Linear):
                        raise ValueError(f"{name}.{factor}.{adapter} is a {type(linear).__name__}, not nn.Linear.")
                    targets.append((f"{name}.{factor}.{adapter}.weight", linear))
        else:
            linear = module.base_layer if _is_lora_layer(module) else module
            if not isinstance(linear, nn.Linear):
                raise ValueError(
                    f"Antidote prunes nn.Linear weights, but {name} is a {type(linear).__name__}. Choose linear "
                    "modules in `target_modules`."
                )
            targets.append((f"{name}.weight", linear))
    if not targets:
        raise ValueError(
            f"None of the modules matching target_modules={config.target_modules!r} carries a LoRA adapter to prune. "
            "Point `target_modules` at the adapted modules, or prune the weights with `prune_target='weights'`."
        )
    if skipped:
        logger.info("Antidote: %d targeted modules carry no active LoRA adapter and are skipped.", len(skipped))
    if mode == "weights" and has_adapter:
        logger.warning(
            "Antidote prunes the base weights of a PEFT model (`prune_target='weights'`); `save_pretrained` of the "
            "adapter does not save them. Merge the adapter first, or prune the adapter factors."
        )
    return mode, targets


# -------------------------------------------------------------------------------------------------- calibration
def tokenize_calibration_dataset(
    dataset, processing_class=None, max_length: int | None = None, dataset_text_field: str = "text"
) -> list[list[int]]:
    """Token ids of each full calibration sequence (prompt + harmful answer), as SFT training would see them.

    Follows TRL's SFT preparation: conversational data (`messages`, or conversational `prompt`/`completion`) goes
    through the tokenizer's chat template; standard `prompt`/`completion` and `text` data are tokenized as the plain
    concatenation with the EOS token appended; a pre-tokenized `input_ids` column is used as is. Sequences are
    truncated to `max_length`, keeping the start.
    """
    from trl.data_utils import is_conversational

    columns = set(dataset.column_names)
    if "input_ids" in columns:
        sequences = [list(ids) for ids in dataset["input_ids"]]
    else:
        if processing_class is None:
            raise ValueError(
                "Antidote needs a tokenizer (`processing_class=`) to tokenize the harmful dataset, or a dataset with "
                "an `input_ids` column."
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        eos = tokenizer.eos_token or ""

        def encode_text(text: str) -> list[int]:
            if eos and not text.endswith(eos):
                text = text + eos
            return list(processing_class(text=text)["input_ids"])

        def encode_chat(messages: list) -> list[int]:
            return list(processing_class.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

        sequences = []
        for example in dataset:
            if "prompt" in example and "completion" in example:
                if is_conversational(example):
                    sequences.append(encode_chat(list(example["prompt"]) + list(example["completion"])))
                else:
                    sequences.append(encode_text(example["prompt"] + example["completion"]))
            elif "messages" in example:
                sequences.append(encode_chat(example["messages"]))
            elif dataset_text_field in example:
                sequences.append(encode_text(example[dataset_text_field]))
            else:
                raise ValueError(
                    f"The harmful dataset has columns {sorted(columns)}; expected `prompt`+`completion`, `messages`, "
                    f"`{dataset_text_field}` or `input_ids`."
                )
    if max_length is not None:
        sequences = [ids[:max_length] for ids in sequences]
    sequences = [ids for ids in sequences if ids]
    if not sequences:
        raise ValueError("The harmful calibration dataset is empty after tokenization.")
    return sequences


def calibration_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, pad_token_id: int, data_collator=None
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches with an attention mask (or batches from `data_collator`, fed `{"input_ids": ids}`)."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        if data_collator is not None:
            batch = data_collator([{"input_ids": list(ids)} for ids in chunk])
            yield {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
            continue
        length = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask}


def input_feature_norms(
    model: nn.Module, modules: Sequence[nn.Module], batches: Iterable[dict[str, torch.Tensor]]
) -> tuple[list[torch.Tensor], int, int]:
    """‖X_j‖ for each module's input, from one pass over the batches in eval mode.

    ‖X_j‖ = sqrt((1/N) Σ_samples Σ_tokens x_j²), N the number of sequences (the official `scaler_row`, a running mean
    over samples of the per-sample token sum); padding positions are left out. Returns the norms (float32, one
    vector per module), N and the number of tokens seen.
    """

    def squares(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x.float()
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x * mask.unsqueeze(-1).to(x.dtype)
        return x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0).double()

    sums, num_samples, num_tokens = input_statistics(model, modules, batches, squares)
    return [torch.sqrt(total / num_samples).float() for total in sums], num_samples, num_tokens


# ------------------------------------------------------------------------------------------------------ masks
def row_top_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask, True on the top `ratio` fraction of each row of `scores` (the weights Antidote zeroes).

    As in the official code: sort each row ascending (stable) and leave the lowest `int(cols·(1−ratio))` unmarked.
    """
    num_kept = int(scores.shape[1] * (1 - ratio))
    order = torch.sort(scores, dim=-1, stable=True).indices
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(1, order[:, :num_kept], False)
    return mask


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def load_calibration_dataset(dataset, config, role: str, who: str, missing: str):
    """A repair's calibration set, as an object or by its config's `<role>_dataset_name`; `<role>_num_samples`
    selects the first rows of either. `missing`: the error message when neither is given."""
    from ...core.config import object_dataset_num_samples, select_num_samples
    from ...core.trainer import check_trl_format, load_named_role_dataset

    if dataset is None:
        name = getattr(config, f"{role}_dataset_name")
        if name is None:
            raise ValueError(missing)
        dataset = load_named_role_dataset(config, role, name)
    else:
        check_trl_format(dataset, role, config.dataset_text_field)
        dataset = select_num_samples(dataset, role, object_dataset_num_samples(config, role, len(dataset), who))
    check_trl_format(dataset, role, config.dataset_text_field)
    return dataset


def _load_harmful_dataset(harmful_dataset, config: AntidoteConfig):
    return load_calibration_dataset(
        harmful_dataset,
        config,
        "harmful",
        "antidote_prune",
        "Antidote's Wanda scores need harmful calibration data: pass `harmful_dataset=` or set "
        "`harmful_dataset_name` (a Hub id or a local file/folder). Without data, use `variant='magnitude'` (|W| only).",
    )


def antidote_prune(
    model: nn.Module,
    harmful_dataset=None,
    config: AntidoteConfig | None = None,
    *,
    processing_class=None,
    data_collator=None,
    output_dir: str | None = None,
) -> nn.Module:
    """Prune, in place, the fine-tuned weights most important for harmful answers, and return the model.

    Args:
        model: the fine-tuned model: a `PeftModel` (its active LoRA adapter's factors are pruned) or a plain causal
            LM (the targeted weight matrices are pruned); distributed wrappers are accepted. Under DeepSpeed ZeRO-3
            every rank must call this with the same data: parameters are gathered and rank 0's edit is broadcast.
        harmful_dataset: the re-alignment set (harmful prompt → harmful answer) in a TRL format; loaded from
            `config.harmful_dataset_name` when omitted. Not needed by the `magnitude` and `random` variants.
        config: an [`AntidoteConfig`] (defaults when omitted).
        processing_class: tokenizer used to tokenize a non-tokenized harmful dataset.
        data_collator: optional collator building calibration batches from `{"input_ids": ...}` examples.
        output_dir: where to write the mask statistics (`antidote_mask_stats.json`); nothing is written when None.
    """
    config = config or AntidoteConfig()
    check_defense_fields(config, warn_no_effect=False)  # again: it may have been changed since it was built
    if config.variant == "wanda":  # its calibration pass is a causal-LM forward
        check_decoder_only(model, "antidote_prune")
    mode, targets = find_antidote_targets(model, config)
    ratio = float(config.prune_ratio)

    norms = None
    calibration = {"samples": 0, "tokens": 0}
    if config.variant == "wanda" and ratio > 0:
        dataset = _load_harmful_dataset(harmful_dataset, config)
        sequences = tokenize_calibration_dataset(
            dataset, processing_class, config.max_length, config.dataset_text_field
        )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None) or 0  # padded positions are masked anyway
        batches = calibration_batches(sequences, config.calibration_batch_size, pad_token_id, data_collator)
        norms, calibration["samples"], calibration["tokens"] = input_feature_norms(
            model, [linear for _, linear in targets], batches
        )

    generator = torch.Generator().manual_seed(config.seed)
    modules_stats = {}
    for index, (name, linear) in enumerate(targets):
        weight = linear.weight
        with torch.no_grad(), gathered([weight], modifier_rank=0):
            rows, cols = weight.shape
            if ratio == 0:
                pruned = 0
            else:
                if config.variant == "wanda":
                    if norms[index].numel() != cols:
                        raise RuntimeError(f"{name}: {norms[index].numel()} input statistics for {cols} columns.")
                    scores = weight.abs().float() * norms[index].to(weight.device).unsqueeze(0)
                elif config.variant == "magnitude":
                    scores = weight.abs().float()
                else:  # random ablation: the same seeded draw on every rank
                    scores = torch.rand((rows, cols), generator=generator).to(weight.device)
                mask = row_top_mask(scores, ratio)
                weight.masked_fill_(mask, 0)
                pruned = int(mask.sum())
        modules_stats[name] = {
            "shape": [rows, cols],
            "pruned": pruned,
            "total": rows * cols,
            "pruned_fraction": pruned / (rows * cols),
        }

    total = sum(s["total"] for s in modules_stats.values())
    total_pruned = sum(s["pruned"] for s in modules_stats.values())
    stats = {
        "defense": "antidote",
        "variant": config.variant,
        "prune_ratio": ratio,
        "prune_target": mode,
        "target_modules": config.target_modules,
        "calibration": calibration,
        "total_pruned": total_pruned,
        "total_weights": total,
        "pruned_fraction": total_pruned / total if total else 0.0,
        "modules": modules_stats,
    }
    logger.info(
        "Antidote (%s, %s) pruned %d of %d weights (%.4f) in %d matrices.",
        config.variant,
        mode,
        total_pruned,
        total,
        stats["pruned_fraction"],
        len(targets),
    )
    if output_dir is not None and _is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, ANTIDOTE_STATS_NAME), "w") as f:
            json.dump(stats, f, indent=2)
    return model
