"""Safety-recovery data augmentation (Qi et al., ICLR 2025), `docs/design/algorithms.md` §2.7.

Each training row is a harmful prompt → refusal, paired by row id with the same prompt → harmful answer (the harmful
dataset). Per row and step, with probability `augment_prob` the row becomes

    harmful prompt ‖ harmful[:k] ‖ refusal,   labels −100 on prompt ‖ harmful[:k],   k ~ U{1, …, min(max_prefix, K)}

(K = harmful answer length without its closing EOS), otherwise it stays prompt → refusal. Every micro-batch is then
concatenated with `anchor_batch_size` utility (anchor) samples into one padded forward, and the loss is one token mean
over the refusal and anchor tokens of the optimizer step (the anchor tokens of the whole step are added to SFT's
`num_items_in_batch`).
"""

from __future__ import annotations

import hashlib

import torch
from trl import SFTTrainer

from ... import compat
from ...core.trainer import DefenseTrainerMixin
from ...core.views import RowAlignedCollator, RowAlignedView, add_row_ids, pop_view


PAIR_COLUMN = "safety_recovery_row"
HARMFUL_PREFIX = "harmful_"  # batch keys of the paired harmful rows
_BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def row_generator(seed: int, step: int, row_id: int) -> torch.Generator:
    """The generator of one row's draw at one optimizer step: seeded from (seed, step, row id), so a resumed run and
    any number of ranks or accumulation steps draw the same k for the same row (a row appears at most once a step)."""
    digest = hashlib.sha256(f"safety-recovery/{seed}/{step}/{row_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63))


def draw_prefix_length(num_harmful: int, generator: torch.Generator, augment_prob: float, max_prefix: int) -> int:
    """k for one row: 0 (plain refusal view) with probability 1 − `augment_prob`, else U{1, …, min(max_prefix,
    num_harmful)}. A harmful answer with no token to prefix gives 0 (the official code raised on `randint(1, 0)`)."""
    augment = torch.rand((), generator=generator).item() < augment_prob
    limit = min(max_prefix, num_harmful)
    if not augment or limit < 1:
        return 0
    return int(torch.randint(1, limit + 1, (), generator=generator).item())


def augment_row(prompt, harmful_answer, refusal, refusal_labels, k: int):
    """(input_ids, labels) of `prompt ‖ harmful_answer[:k] ‖ refusal`, the loss on the refusal only (1-D tensors)."""
    context = torch.cat([prompt, harmful_answer[:k]])
    ignored = torch.full_like(context, -100)
    return torch.cat([context, refusal]), torch.cat([ignored, refusal_labels])


def _split_row(input_ids, attention_mask, labels):
    """(prompt, answer, answer labels) of one right-padded row: the answer starts at its first supervised token."""
    real = attention_mask.bool()
    ids, row_labels = input_ids[real], labels[real]
    supervised = (row_labels != -100).nonzero()
    start = int(supervised[0]) if len(supervised) else len(ids)
    return ids[:start], ids[start:], row_labels[start:]


def pad_rows(rows, pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) into a batch."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long, device=device)
    labels = torch.full((len(rows), length), -100, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for index, (ids, row_labels) in enumerate(rows):
        input_ids[index, : len(ids)] = ids
        labels[index, : len(ids)] = row_labels
        attention_mask[index, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _rows_of(batch: dict):
    rows = []
    for index in range(batch["input_ids"].size(0)):
        real = batch["attention_mask"][index].bool()
        rows.append((batch["input_ids"][index][real], batch["labels"][index][real]))
    return rows


class SafetyRecoveryTrainer(DefenseTrainerMixin, SFTTrainer):
    """
    Trainer for safety-recovery data augmentation: SFT on harmful prompt → refusal where half of the rows (by default)
    start the answer with the first k tokens of a harmful answer and then recover with the refusal, mixed with utility
    anchor samples in one token-mean loss.

    `train_dataset` holds harmful prompts → refusals (prompt-completion format), `harmful_dataset` the same prompts →
    harmful answers, row i paired with row i (joined on a row id, so shuffling, sharding and TRL's row filtering keep
    the pairs), and `alignment_dataset` the utility anchor data (any TRL format). See [`SafetyRecoveryConfig`].

    Example:

    ```python
    from trl_safety import SafetyRecoveryConfig, SafetyRecoveryTrainer

    trainer = SafetyRecoveryTrainer(
        model="aligned-model",
        args=SafetyRecoveryConfig(output_dir="safety-recovery", augment_prob=0.5, anchor_batch_size=16),
        train_dataset=refusal_dataset,
        harmful_dataset=harmful_dataset,
        alignment_dataset=anchor_dataset,
    )
    trainer.train()
    ```
    """

    extra_datasets = ("alignment", "harmful")
    split_dependence = (
        "Each micro-batch draws `anchor_batch_size` anchor samples (the official per-device count), so splitting a "
        "step into more micro-batches draws more anchors."
    )

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, *positional, **kwargs):
        if args is not None and (getattr(args, "packing", False) or getattr(args, "padding_free", False)):
            raise ValueError(
                "SafetyRecoveryTrainer does not support `packing` or `padding_free`: it rebuilds each row (prompt ‖ "
                "harmful prefix ‖ refusal). Set `packing=False` and `padding_free=False`."
            )
        self._augments = args is not None and getattr(args, "augment_prob", 0.5) > 0
        if self._augments:
            if args.completion_only_loss is False:
                raise ValueError(
                    "SafetyRecoveryTrainer trains on the refusal only: leave `completion_only_loss` unset or True."
                )
            if train_dataset is not None:
                self._check_prompt_completion(train_dataset, "train_dataset", "completion = the refusal")
                train_dataset = add_row_ids(train_dataset, "train_dataset", PAIR_COLUMN, keep_existing=True)
        super().__init__(model, args, data_collator, train_dataset, *positional, **kwargs)

    @staticmethod
    def _check_prompt_completion(dataset, name: str, what: str) -> None:
        columns = getattr(dataset, "column_names", None) or []
        missing = [column for column in ("prompt", "completion") if column not in columns]
        if missing:
            raise ValueError(
                f"SafetyRecoveryTrainer needs the {name} in prompt-completion format (`prompt` = the harmful prompt, "
                f"`{what}`), standard or conversational; it lacks the column(s) {missing} (has {columns})."
            )

    def _load_extra_dataset(self, role, dataset, args):
        dataset = super()._load_extra_dataset(role, dataset, args)
        if role == "harmful" and args.augment_prob > 0:
            self._check_prompt_completion(dataset, "harmful_dataset", "completion = the harmful answer")
            dataset = add_row_ids(dataset, "harmful_dataset", PAIR_COLUMN, keep_existing=True)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._augments:
            compat.extend_signature_columns(self, [PAIR_COLUMN])

    def setup_defense(self) -> None:
        self._eos_token_id = getattr(self.processing_class, "eos_token_id", None)
        if self._eos_token_id is None and hasattr(self.processing_class, "tokenizer"):
            self._eos_token_id = self.processing_class.tokenizer.eos_token_id
        self._pad_token_id = self.data_collator.pad_token_id if hasattr(self.data_collator, "pad_token_id") else 0
        if self._augments:
            harmful = RowAlignedView(self.harmful_dataset, "harmful_dataset", PAIR_COLUMN)
            harmful.require(
                self.train_dataset,
                "train_dataset",
                "Safety-recovery pairs train_dataset row i (prompt → refusal) with harmful_dataset row i (the same "
                "prompt → harmful answer) and found no harmful partner for them; give a harmful dataset with one "
                "row per train row.",
            )
            self.data_collator = RowAlignedCollator(self.data_collator, {HARMFUL_PREFIX: harmful}, PAIR_COLUMN)
        self._anchor_batches = (
            self.cycling_batches("alignment", self.args.anchor_batch_size) if self.args.anchor_batch_size > 0 else None
        )
        self._anchor_queue: list[dict] = []
        self._anchor_step = -1
        self._anchor_items = None

    def defense_state_dict(self):
        return {"anchor_batches": None if self._anchor_batches is None else self._anchor_batches.state_dict()}

    def load_defense_state_dict(self, state):
        if self._anchor_batches is not None and state.get("anchor_batches") is not None:
            self._anchor_batches.load_state_dict(state["anchor_batches"])

    # ------------------------------------------------------------------------------------------------ the batch
    def augment_batch(self, inputs: dict, harmful: dict, row_ids: torch.Tensor) -> dict:
        """The micro-batch with each row rebuilt as its draw says (k = 0 leaves the row as it is)."""
        args = self.args
        step = self.state.global_step
        rows, prefix_lengths = [], []
        for index in range(inputs["input_ids"].size(0)):
            prompt, refusal, refusal_labels = _split_row(
                inputs["input_ids"][index], inputs["attention_mask"][index], inputs["labels"][index]
            )
            harmful_prompt, answer, _ = _split_row(
                harmful["input_ids"][index], harmful["attention_mask"][index], harmful["labels"][index]
            )
            if not args.include_eos_in_prefix and len(answer) and int(answer[-1]) == self._eos_token_id:
                answer = answer[:-1]
            generator = row_generator(args.seed, step, int(row_ids[index]))
            k = draw_prefix_length(len(answer), generator, args.augment_prob, args.max_prefix_tokens)
            if k == 0:
                rows.append((torch.cat([prompt, refusal]), torch.cat([torch.full_like(prompt, -100), refusal_labels])))
            else:
                ids, labels = augment_row(harmful_prompt, answer, refusal, refusal_labels, k)
                if args.max_length is not None:
                    ids, labels = ids[: args.max_length], labels[: args.max_length]
                rows.append((ids, labels))
            prefix_lengths.append(k)
        augmented = [k for k in prefix_lengths if k > 0]
        self.log_metric("augmented_fraction", len(augmented) / len(prefix_lengths))
        if augmented:
            self.log_metric("prefix_length", sum(augmented) / len(augmented))
        return pad_rows(rows, self._pad_token_id, inputs["input_ids"].device)

    def _next_anchor_batch(self, device) -> dict:
        """This micro-batch's anchor batch. At the step's first micro-batch, the anchor batches of the whole step are
        drawn, so their token count (over every rank, as SFT's) joins the step's loss normaliser."""
        step = self.state.global_step
        if self._anchor_step != step:
            if self._anchor_queue:
                raise RuntimeError(
                    f"{len(self._anchor_queue)} anchor batches of step {self._anchor_step} were unused."
                )
            count = compat.current_accumulation_steps(self)
            self._anchor_queue = [compat.prepare_inputs(self, next(self._anchor_batches)) for _ in range(count)]
            self._anchor_items = compat.num_items_in_batch(self, self._anchor_queue, device)
            self._anchor_step = step
        if not self._anchor_queue:
            raise RuntimeError(f"Step {step} ran more micro-batches than `current_gradient_accumulation_steps`.")
        return self._anchor_queue.pop(0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        row_ids = inputs.pop(PAIR_COLUMN, None)
        harmful = pop_view(inputs, HARMFUL_PREFIX)
        if self.model.training and (row_ids is not None or self._anchor_batches is not None):
            extra = sorted(set(inputs) - set(_BATCH_KEYS))
            if extra:
                raise ValueError(
                    f"SafetyRecoveryTrainer rebuilds batches of {_BATCH_KEYS} only; the collator also gave {extra}."
                )
            if row_ids is not None:
                inputs = self.augment_batch(inputs, harmful, row_ids)
            if self._anchor_batches is not None:
                device = inputs["input_ids"].device
                anchors = self._next_anchor_batch(device)
                rows = _rows_of(inputs) + _rows_of({key: anchors[key] for key in _BATCH_KEYS})
                inputs = pad_rows(rows, self._pad_token_id, device)
                if num_items_in_batch is not None and self._anchor_items is not None:
                    num_items_in_batch = num_items_in_batch + self._anchor_items
                self.log_metric("anchor_fraction", len(_rows_of(anchors)) / len(rows))
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
