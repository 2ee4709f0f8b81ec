"""`EmbeddingDriftCallback`: the Vaccine paper's harmful embedding drift, measured during any training run."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback

from ..core.hooks import capture_outputs
from ..core.layers import get_attention_modules, get_decoder_layers, unwrap_model
from .logging_utils import log_metrics


logger = logging.getLogger(__name__)

POSITIONS = ("layer", "attention")
# The callback's metric namespace: the mean under the bare name, each layer under `<namespace>/layer_{l}`
# (`docs/design/architecture.md` §14)
METRIC_NAMESPACE = "embedding_drift"
_PROMPT_COLUMNS = ("prompt", "messages", "text")


class EmbeddingDriftCallback(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that measures how far the hidden states of a fixed prompt set drift from
    those of the model at the start of training: the "harmful embedding drift" of the Vaccine paper
    ([2402.01109](https://huggingface.co/papers/2402.01109)), which grows when fine-tuning on harmful data breaks
    the alignment.

    At `on_train_begin` the callback runs the prompts through the model and keeps the reference hidden states
    h⁽⁰⁾ (on CPU, in the model's dtype). Every `every_n_steps` optimizer steps it runs them again and logs, for
    each selected layer l,

        drift_l = (1 / N) Σ_i Σ_{t real} ‖h_l⁽ˢ⁾(x_i)_t − h_l⁽⁰⁾(x_i)_t‖₂,

    the L2 norm over the hidden dimension of the change of token t's hidden state, averaged over the N real (non
    padding) tokens of all prompts, plus `embedding_drift` = the mean of drift_l over the selected layers. h_l is the
    output of decoder layer l (the residual stream after the layer), or with `position="attention"` the output of
    its attention module (after `o_proj`, before the residual add: where Vaccine perturbs). The step-0 value is
    logged at train begin from a second forward pass; it is exactly zero unless the forward is non-deterministic.

    Logged keys: `embedding_drift` and `embedding_drift/layer_{l}` (l = decoder-layer index), the callbacks' metric
    convention (`docs/design/architecture.md` §14).

    Measurement runs under `torch.no_grad()` with every module in eval mode (dropout off), then restores each
    module's previous train/eval flag. Prompts are right-padded and padding is masked out, so the values do not
    depend on `batch_size`. PEFT models are measured with their adapters active. In multi-process runs every rank
    measures the full prompt set (all ranks take part in each forward, which ZeRO-3 and FSDP require) and gets the
    same value. The reference is the model at the start of the current `train()` call: a resumed run measures
    drift from the resumed weights.

    Args:
        prompts (`list[str]`, `list[list[dict]]` or [`~datasets.Dataset`]):
            Fixed prompt set, e.g. harmful requests whose refusals should not move. Plain strings, conversations
            (rendered with the chat template; a generation prompt is added when the last turn is not the
            assistant's), or a dataset with a `"prompt"`, `"messages"` or `"text"` column (standard or
            conversational).
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer. Defaults to the `processing_class` the trainer passes to callbacks.
        every_n_steps (`int`, *optional*, defaults to `50`):
            Measure every this many optimizer steps (and once at train begin).
        layers (`list[int]`, *optional*):
            Decoder-layer indices to measure (negative indices count from the end). All layers when `None`.
        trainer ([`~transformers.Trainer`], *optional*):
            The trainer this callback is added to. With it, values go through the trainer's logging, so every
            `report_to` integration (W&B, TensorBoard, Trackio, …), the console and `state.log_history` get them.
            Without it they are only appended to `state.log_history` and the Python logger.
        position (`str`, *optional*, defaults to `"layer"`):
            `"layer"` for decoder-layer outputs, `"attention"` for attention-module outputs.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per forward pass.
        max_length (`int` or `None`, *optional*, defaults to `512`):
            Truncate prompts to this many tokens.
        prompt_column (`str`, *optional*):
            Dataset column holding the prompts, when it is not `"prompt"`, `"messages"` or `"text"`.

    Example:

    ```python
    from trl import SFTTrainer
    from trl_safety.callbacks import EmbeddingDriftCallback

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset)
    drift = EmbeddingDriftCallback(
        ["Explain how to do [HARMFUL_TASK_17]", "Describe [HARMFUL_TASK_3]"], every_n_steps=20, trainer=trainer
    )
    trainer.add_callback(drift)
    trainer.train()  # logs embedding_drift and embedding_drift/layer_{l}
    ```
    """

    def __init__(
        self,
        prompts: Sequence[str] | Sequence[list[dict]] | Dataset,
        processing_class=None,
        every_n_steps: int = 50,
        layers: Sequence[int] | None = None,
        *,
        trainer: Trainer | None = None,
        position: str = "layer",
        batch_size: int = 8,
        max_length: int | None = 512,
        prompt_column: str | None = None,
    ):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive integer, got {every_n_steps!r}.")
        if position not in POSITIONS:
            raise ValueError(f"`position` must be one of {POSITIONS}, got {position!r}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"`max_length` must be a positive integer or None, got {max_length!r}.")
        self.prompts = _prompt_list(prompts, prompt_column)
        self.processing_class = processing_class
        self.every_n_steps = every_n_steps
        self.layers = None if layers is None else [int(index) for index in layers]
        self.trainer = trainer
        self.position = position
        self.batch_size = batch_size
        self.max_length = max_length
        # (step, metrics) of every measurement, for programmatic access
        self.history: list[tuple[int, dict[str, float]]] = []
        self._batches: list[dict[str, torch.Tensor]] | None = None
        self._layer_indices: list[int] | None = None
        self._reference: list[list[torch.Tensor]] | None = None
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        tokenizer = self.processing_class if self.processing_class is not None else processing_class
        if tokenizer is None:
            raise ValueError("EmbeddingDriftCallback needs a tokenizer: pass `processing_class=`.")
        self._batches = self._tokenize(getattr(tokenizer, "tokenizer", tokenizer))
        self._layer_indices = self._resolve_layers(model)
        self._reference = self._hidden_states(model, args.device)
        self._measure_and_log(model, args, state, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._reference is None or state.global_step % self.every_n_steps != 0:
            return
        if state.global_step == self._last_step:
            return
        self._measure_and_log(model, args, state, control)

    # ------------------------------------------------------------------------------------------------- measurement
    def compute_drift(self, model, device: torch.device | str | None = None) -> dict[str, float]:
        """Drift of `model` from the reference recorded at train begin (see the class docstring for the formula)."""
        if self._reference is None:
            raise RuntimeError("No reference hidden states yet: they are recorded at `on_train_begin`.")
        current = self._hidden_states(model, device)
        sums = [0.0] * len(self._layer_indices)
        num_tokens = 0
        for batch, reference, hidden in zip(self._batches, self._reference, current):
            mask = batch["attention_mask"].bool()
            num_tokens += int(mask.sum())
            for position, (h0, h) in enumerate(zip(reference, hidden)):
                # L2 over the hidden dimension, in float64 so the average does not depend on the batch layout
                norms = torch.linalg.vector_norm(h.double() - h0.double(), dim=-1)
                sums[position] += float(norms[mask].sum())
        per_layer = {f"{METRIC_NAMESPACE}/layer_{i}": s / num_tokens for i, s in zip(self._layer_indices, sums)}
        metrics = {METRIC_NAMESPACE: math.fsum(per_layer.values()) / len(per_layer)}
        metrics.update(per_layer)
        return metrics

    def _measure_and_log(self, model, args, state, control) -> None:
        metrics = self.compute_drift(model, args.device)
        self._last_step = state.global_step
        self.history.append((state.global_step, dict(metrics)))
        log_metrics(self.trainer, state, control, metrics)
        logger.info("Embedding drift at step %d: %.6g", state.global_step, metrics[METRIC_NAMESPACE])

    def _modules(self, model) -> list[torch.nn.Module]:
        if self.position == "attention":
            modules = get_attention_modules(model)
        else:
            modules = list(get_decoder_layers(model))
        return [modules[index] for index in self._layer_indices]

    def _resolve_layers(self, model) -> list[int]:
        num_layers = len(get_decoder_layers(model))
        if self.layers is None:
            return list(range(num_layers))
        resolved = []
        for index in self.layers:
            if not -num_layers <= index < num_layers:
                raise ValueError(
                    f"`layers` holds {index}, but the model has {num_layers} decoder layers "
                    f"(valid indices: 0..{num_layers - 1} or negative from the end)."
                )
            resolved.append(index % num_layers)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"`layers={self.layers}` selects the same layer twice.")
        return resolved

    @torch.no_grad()
    def _hidden_states(self, model, device) -> list[list[torch.Tensor]]:
        """Per batch, the selected modules' outputs (on CPU, in the model's dtype)."""
        modules = self._modules(model)
        base = unwrap_model(model)
        forward_kwargs = {"use_cache": False}
        # Only the hidden states matter: skip the vocabulary-sized logits where the model allows it
        if "logits_to_keep" in inspect.signature(base.forward).parameters:
            forward_kwargs["logits_to_keep"] = 1
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            outputs = []
            for batch in self._batches:
                with capture_outputs(modules) as captured:
                    model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        **forward_kwargs,
                    )
                if any(hidden is None for hidden in captured):
                    raise RuntimeError("A measured module did not run during the forward pass.")
                outputs.append([hidden.detach().to("cpu") for hidden in captured])
        finally:
            # Restore each module's own flag: some modules (e.g. a frozen teacher) may have been in eval on purpose
            for module, training in modes:
                module.training = training
        return outputs

    def _tokenize(self, tokenizer) -> list[dict[str, torch.Tensor]]:
        sequences = []
        for prompt in self.prompts:
            if isinstance(prompt, str):
                text, add_special_tokens = prompt, True
            else:
                generation_prompt = prompt[-1].get("role") != "assistant"
                text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=generation_prompt)
                # The chat template already holds the special tokens it needs (as in TRL's tokenization)
                add_special_tokens = False
            ids = tokenizer(
                text,
                add_special_tokens=add_special_tokens,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            )["input_ids"]
            if len(ids) == 0:
                raise ValueError(f"Prompt {prompt!r} tokenizes to no tokens.")
            sequences.append(ids)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            # Right padding: with a causal mask, real tokens never see the padding that follows them
            input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in chunk], dtype=torch.long)
            attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk])
            batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
        return batches


def _prompt_list(prompts, prompt_column: str | None) -> list:
    if isinstance(prompts, Dataset):
        column = prompt_column or next((c for c in _PROMPT_COLUMNS if c in prompts.column_names), None)
        if column is None or column not in prompts.column_names:
            raise ValueError(
                f"The prompt dataset has columns {prompts.column_names}; expected one of {list(_PROMPT_COLUMNS)} "
                "or `prompt_column=`."
            )
        prompts = prompts[column]
    elif isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("EmbeddingDriftCallback needs at least one prompt.")
    for prompt in prompts:
        is_conversation = isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt)
        if not isinstance(prompt, str) and not is_conversation:
            raise TypeError(f"Each prompt must be a string or a list of chat messages, got {prompt!r}.")
    return prompts
