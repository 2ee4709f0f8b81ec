"""`LisaCallback`: Lisa's whole Bi-State Optimization (alignment steps + proximal terms) inside any Trainer loop."""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from transformers import TrainerCallback

from .. import compat
from ..core.batches import CyclingBatches
from ..core.config import check_range
from ..core.distributed import backend_name
from ..core.losses import lm_forward
from ..core.proximal import ProximalTerm, micro_batches_in_step, proximal_active
from ..core.snapshot import ParameterSnapshot, trainable_parameters
from ..core.state_io import load_defense_state, save_defense_state
from ..core.trainer import check_trl_format
from ..defenses.lisa.lisa_trainer import ALIGNMENT, FINETUNE, enter_phase
from .logging_utils import log_metrics


logger = logging.getLogger(__name__)

STATE_FOLDER = "lisa_callback"  # sub-folder of a checkpoint holding the callback's state (safetensors + JSON)
STATE_NAME = "lisa_callback"


class _LoaderHost:
    """What [`CyclingBatches`] needs from a trainer, for a host whose own collator is not an SFT one (DPO, GRPO…)."""

    def __init__(self, accelerator, data_collator):
        self.accelerator = accelerator
        self.data_collator = data_collator

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # the SFT view built here has only `input_ids` and `labels`


def _tokenize_sft(dataset, tokenizer, max_length: int | None):
    """Tokenize alignment rows for the SFT loss on a non-SFT host: `input_ids` and `labels` (prompt tokens masked).

    Accepts TRL's prompt-completion and language-modeling formats, standard or conversational; an EOS token ends the
    completion, as `SFTTrainer` does.
    """
    columns = set(dataset.column_names)
    eos = tokenizer.eos_token or ""

    def encode(row):
        if "prompt" in columns and "completion" in columns:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, list):  # conversational
                prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
                ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True)
            else:
                completion = completion if completion.endswith(eos) else completion + eos
                prompt_ids = tokenizer(text=prompt)["input_ids"]
                ids = tokenizer(text=prompt + completion)["input_ids"]
            if hasattr(prompt_ids, "keys"):
                prompt_ids, ids = prompt_ids["input_ids"], ids["input_ids"]
            labels = [-100] * len(prompt_ids) + list(ids[len(prompt_ids) :])
        elif "messages" in columns:
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            labels = list(ids)
        elif "text" in columns:
            text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
            ids = tokenizer(text=text)["input_ids"]
            labels = list(ids)
        else:
            raise ValueError(
                f"LisaCallback: the alignment dataset has columns {sorted(columns)}; it needs `prompt`/`completion`, "
                "`messages` or `text` (TRL's SFT formats)."
            )
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": list(ids), "labels": labels}

    return dataset.map(encode, remove_columns=dataset.column_names, desc="Tokenizing alignment dataset (LisaCallback)")


def _summed_nll(model, inputs) -> torch.Tensor:
    """Summed token NLL of the labels: through TRL's fused LM head when SFTTrainer patched it in, else the logits
    (a host that patched `forward` for another purpose, as ORPO does, returns logits even when asked for the fused
    head)."""
    outputs = lm_forward(model, inputs)
    log_probs = getattr(outputs, "log_probs", None)
    if log_probs is not None:
        return -log_probs.sum()
    logits, labels = outputs.logits[:, :-1], inputs["labels"][:, 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


class LisaCallback(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that runs Lisa's Bi-State Optimization inside any trainer's loop
    ([`~trl.SFTTrainer`], [`~trl.DPOTrainer`], [`~trl.GRPOTrainer`], a plain [`~transformers.Trainer`], …).

    Before host steps 0, K2, 2·K2, … the callback runs K1 *alignment steps*: each is a full optimizer step of the SFT
    loss (token cross-entropy over the completion) on `gradient_accumulation_steps` alignment micro-batches of
    `per_device_train_batch_size` rows, through the host's model, optimizer, accelerator and gradient clipping. The
    optimizer steps therefore follow [`LisaTrainer`]'s sequence `a…a u…u a…a`: K1 alignment steps, then K2 steps of
    the host's own objective (DPO, GRPO, SFT, …). Both states carry Lisa's proximal gradient ρ(w − anchor), anchored
    as in [`LisaTrainer`] (alignment steps towards the weights at the end of the last host state, host steps towards
    the weights at the end of the last alignment state; both start as the initial weights), and off during the same
    warm-up (`proximal_warmup_ratio` of all optimizer steps).

    **Counting.** `max_steps` (or the epochs) counts the host's steps only: alignment steps are extra optimizer steps,
    K1·⌈max_steps / K2⌉ of them, and the warm-up is a ratio of the total. The learning-rate scheduler advances on host
    steps only, so an alignment block runs at the learning rate of the host step that follows it and the host's
    schedule over `max_steps` is unchanged. (`LisaTrainer` counts alignment steps inside `max_steps` and its
    scheduler advances on every step: with a constant schedule both give the same learning rates.)

    Under DeepSpeed the engine steps its own scheduler on every optimizer step, alignment steps included.

    Args:
        trainer ([`~transformers.Trainer`]):
            The host trainer (its model, optimizer, accelerator and tokenizer are used). Add the callback with
            `trainer.add_callback(LisaCallback(trainer, alignment_dataset))`.
        alignment_dataset ([`~datasets.Dataset`]):
            Harmful prompts paired with refusals or safe answers, in a TRL SFT format (prompt-completion, messages
            or text). On an [`~trl.SFTTrainer`] host it is prepared by the host's SFT pipeline (exactly as
            [`LisaTrainer`] prepares it); elsewhere it is tokenized here with the host's tokenizer (prompt tokens
            masked, truncated to the host's `max_length` when it has one).
        rho (`float`, *optional*, defaults to `1.0`): proximal intensity ρ (`0` gives BSO).
        alignment_steps (`int`, *optional*, defaults to `100`): K1, alignment steps per alignment state.
        finetune_steps (`int`, *optional*, defaults to `900`): K2, host steps per fine-tuning state (≥ 1).
        proximal_warmup_ratio (`float`, *optional*, defaults to `0.1`): the proximal term is off for the optimizer
            steps `0 … ⌊ratio · total⌋`, total = host steps + alignment steps.

    Logged: `lisa/alignment_loss` (the SFT loss of each alignment step, averaged over the logging interval),
    `lisa/proximal_term` (ρ/2‖w − anchor‖² of each optimizer step, alignment and host).

    Checkpoints: the anchors (safetensors), the state and the alignment loader's position (JSON) are written to
    `<checkpoint>/lisa_callback/`. A resumed run reads them from `args.resume_from_checkpoint` when set, else from
    `<output_dir>/checkpoint-<step>`.

    Example:

    ```python
    from trl import DPOConfig, DPOTrainer
    from trl_safety.callbacks import LisaCallback

    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir="dpo", max_steps=900), train_dataset=pairs,
                         processing_class=tokenizer)
    trainer.add_callback(LisaCallback(trainer, refusals, rho=1.0, alignment_steps=10, finetune_steps=90))
    trainer.train()
    ```
    """

    def __init__(
        self,
        trainer,
        alignment_dataset,
        rho: float = 1.0,
        alignment_steps: int = 100,
        finetune_steps: int = 900,
        proximal_warmup_ratio: float = 0.1,
    ):
        self.trainer = trainer
        self.alignment_dataset = alignment_dataset
        self.rho = rho
        self.alignment_steps = alignment_steps
        self.finetune_steps = finetune_steps
        self.proximal_warmup_ratio = proximal_warmup_ratio
        check_range(self, "rho", 0.0)
        check_range(self, "alignment_steps", 0)
        check_range(self, "finetune_steps", 1)
        check_range(self, "proximal_warmup_ratio", 0.0, 1.0)
        if alignment_dataset is None:
            raise ValueError(
                "LisaCallback needs an `alignment_dataset` (harmful prompt -> refusal, a TRL SFT format)."
            )
        check_trl_format(alignment_dataset, "alignment", getattr(trainer.args, "dataset_text_field", "text"))
        self._batches: CyclingBatches | None = None
        self.term: ProximalTerm | None = None
        self._anchors: dict[str, ParameterSnapshot] = {}
        self._phase: str | None = None
        self._scale = 1.0
        self._total_steps = 0
        self._unlogged: dict[str, list[float]] = {}  # values since the last training log (a host without TRL's buffer)

    # ------------------------------------------------------------------------------------------------ counting
    def alignment_steps_before(self, host_step: int) -> int:
        """Alignment steps run before host step `host_step` (0-based): K1 per block, a block before each K2 steps."""
        return self.alignment_steps * math.ceil(host_step / self.finetune_steps)

    def optimizer_step_of(self, host_step: int) -> int:
        """Index among all optimizer steps (host + alignment) of host step `host_step`, the warm-up's clock."""
        blocks = host_step // self.finetune_steps + 1
        return host_step + self.alignment_steps * blocks

    # ------------------------------------------------------------------------------------------------ set-up
    def _refuse(self, reason: str):
        raise NotImplementedError(f"LisaCallback cannot run on {type(self.trainer).__name__}: {reason}")

    def _prepare_batches(self):
        trainer = self.trainer
        from trl import SFTTrainer

        if isinstance(trainer, SFTTrainer):
            # The host's SFT pipeline and collator: the alignment batches of `LisaTrainer`
            prepared = compat.prepare_dataset(trainer, self.alignment_dataset, trainer.args, "alignment (trl_safety)")
            host = trainer
        else:
            tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
            if tokenizer is None or not callable(tokenizer):
                self._refuse("it has no tokenizer (`processing_class`) to tokenize the alignment data with.")
            max_length = getattr(trainer.args, "max_length", None)
            prepared = _tokenize_sft(
                self.alignment_dataset, tokenizer, max_length if isinstance(max_length, int) else None
            )
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            host = _LoaderHost(trainer.accelerator, compat.sft_collator(pad))
        return CyclingBatches(
            host,
            prepared,
            batch_size=compat.train_batch_size(trainer),
            description="alignment",
            seed=trainer.args.seed,
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        if trainer is None:
            raise ValueError("LisaCallback needs the host trainer: `LisaCallback(trainer, alignment_dataset)`.")
        if model is not None and model is not trainer.model:
            raise ValueError("LisaCallback was given another trainer than the one it is added to.")
        backend = backend_name(trainer.accelerator)
        if backend == "fsdp":
            self._refuse(
                "FSDP is not supported (the proximal gradient hooks are untested on FSDP's sharded parameters)."
            )
        if getattr(trainer, "defense_name", "") == "lisa":
            self._refuse("it is a LisaTrainer, which runs Lisa already.")
        if trainer.optimizer is None:
            self._refuse("its optimizer is not created at `on_train_begin`.")
        params = trainable_parameters(trainer.model)
        if not params:
            raise ValueError("LisaCallback found no trainable parameter (`requires_grad=True`) in the model.")
        if self._batches is None and self.alignment_steps > 0:
            self._batches = self._prepare_batches()
        self._total_steps = state.max_steps + self.alignment_steps_before(state.max_steps)
        self._anchors = {ALIGNMENT: ParameterSnapshot(params), FINETUNE: ParameterSnapshot(params)}
        self._phase = None
        self.term = ProximalTerm(params, self.rho, anchor=self._anchors[FINETUNE], scale=lambda: self._scale)
        if state.global_step > 0:
            self._restore(args, state)
        if self.rho > 0:
            self.term.attach()
        logger.info(
            "LisaCallback on %s: K1=%d, K2=%d, rho=%s, %d host + %d alignment steps.",
            type(trainer).__name__,
            self.alignment_steps,
            self.finetune_steps,
            self.rho,
            state.max_steps,
            self._total_steps - state.max_steps,
        )

    def _enter(self, phase: str) -> None:
        """`LisaTrainer._enter`: at a switch, snapshot the weights the new state is pulled to."""
        self.term.anchor = enter_phase(self._anchors, self._phase, phase)
        self._phase = phase

    # ------------------------------------------------------------------------------------------------ steps
    def on_step_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.term is None:
            return
        step = state.global_step
        if step % self.finetune_steps == 0 and self.alignment_steps > 0:
            first = self.alignment_steps_before(step)
            for i in range(self.alignment_steps):
                self._alignment_step(first + step + i)
        self._enter(FINETUNE)
        self._scale = 1.0 / micro_batches_in_step(args, step, train_dataloader)
        self.term.enabled = proximal_active(
            self.optimizer_step_of(step), self._total_steps, self.proximal_warmup_ratio
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.term is not None:
            self._log("proximal_term", self.term.pop_value() or 0.0)

    def _alignment_step(self, optimizer_step: int) -> None:
        """One optimizer step of the SFT loss on alignment batches, through the host's machinery."""
        trainer, args = self.trainer, self.trainer.args
        accelerator, model = trainer.accelerator, trainer.model_wrapped
        self._enter(ALIGNMENT)
        self.term.enabled = proximal_active(optimizer_step, self._total_steps, self.proximal_warmup_ratio)
        k = args.gradient_accumulation_steps
        self._scale = 1.0 / k
        # moved here, not by the host's `_prepare_inputs` (GRPO's generates completions there)
        batches = [send_to_device(next(self._batches), accelerator.device) for _ in range(k)]
        num_items = sum((b["labels"][..., 1:] != -100).sum() for b in batches)
        loss_scale = 1
        if accelerator.num_processes > 1 and args.average_tokens_across_devices:
            # as SFT: the token count of every rank, and DDP's averaging undone
            num_items = accelerator.gather(num_items.reshape(1)).sum()
            loss_scale = accelerator.num_processes
        was_syncing = compat.sync_gradients(accelerator)
        deepspeed = backend_name(accelerator).startswith("zero")
        model.train()
        total = 0.0
        try:
            for i, inputs in enumerate(batches):
                last = i == k - 1
                compat.set_sync_gradients(accelerator, last)
                no_sync = contextlib.nullcontext if (last or deepspeed) else (lambda: accelerator.no_sync(model))
                with no_sync():
                    with trainer.compute_loss_context_manager():
                        loss = _summed_nll(model, inputs)
                        loss = loss / num_items * loss_scale
                    accelerator.backward(loss, **({"scale_wrt_gas": False} if deepspeed else {}))
                total += float(loss.detach()) / loss_scale
            if args.max_grad_norm and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            trainer.optimizer.step()
            model.zero_grad()
        finally:
            compat.set_sync_gradients(accelerator, was_syncing)
        self._log("alignment_loss", total)
        self._log("proximal_term", self.term.pop_value() or 0.0)

    def _log(self, name: str, value: float) -> None:
        if compat.has_metrics_buffer(self.trainer):
            compat.metrics_buffer(self.trainer, "train")[f"lisa/{name}"].append(value)
        else:
            self._unlogged.setdefault(f"lisa/{name}", []).append(value)

    def on_log(self, args, state, control, logs=None, **kwargs):
        unlogged = self._unlogged
        if not unlogged or logs is None or "loss" not in logs:
            return
        metrics = {name: sum(values) / len(values) for name, values in unlogged.items()}
        self._unlogged = {}
        log_metrics(self.trainer, state, control, metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.term is not None:
            self.term.remove()
            self.term = None

    # ------------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {
            "phase": self._phase,
            "anchors": {name: snapshot.state_dict() for name, snapshot in self._anchors.items()},
            "alignment_batches": None if self._batches is None else self._batches.state_dict(),
        }

    def on_save(self, args, state, control, **kwargs):
        if self.term is None:
            return
        folder = os.path.join(compat.checkpoint_folder(self.trainer), STATE_FOLDER)
        if self.trainer.is_world_process_zero():
            os.makedirs(folder, exist_ok=True)
            save_defense_state(folder, STATE_NAME, {**self.state_dict(), "global_step": state.global_step})

    def _restore(self, args, state) -> None:
        candidates = [args.resume_from_checkpoint, os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        for checkpoint in filter(None, candidates):
            folder = os.path.join(checkpoint, STATE_FOLDER)
            if os.path.isdir(folder):
                name, saved = load_defense_state(folder)
                if name != STATE_NAME or saved.get("global_step") != state.global_step:
                    raise ValueError(
                        f"LisaCallback: {folder} holds the state of step {saved.get('global_step')}, not of the "
                        f"resumed step {state.global_step}."
                    )
                self._phase = saved["phase"]
                for phase, snapshot in self._anchors.items():
                    snapshot.load_state_dict(saved["anchors"][phase])
                if self._batches is not None and saved.get("alignment_batches") is not None:
                    self._batches.load_state_dict(saved["alignment_batches"])
                return
        raise ValueError(
            f"LisaCallback: the run resumes at step {state.global_step} but no `{STATE_FOLDER}/` state was found in "
            f"{[c for c in candidates if c]}. Set `resume_from_checkpoint` in the training arguments to the "
            "checkpoint folder you resume from."
        )
