"""RepNoise: Representation Noising (Rosati et al., NeurIPS 2024), `docs/design/algorithms.md` §2.5.

On a paired micro-batch (harmless = harmful prompt → refusal, harmful = same prompt → harmful answer):

    L = L_harmless + β · MMD_noise − α · log(L̄_harm + 1)

- L_harmless: cross-entropy of the refusal on the tokens that differ from the paired harmful sequence;
- MMD_noise: mean over decoder layers of MMD(masked MLP output of the harmful batch, masked Gaussian noise), each
  sample flattened, kernel = Σ of 5 Gaussians with bandwidths b·2^(i−2), b = mean pairwise squared distance;
- L̄_harm: (CE of the final logits + Σ_h CE(lm_head(norm(h))) over all hidden states h) / number of hidden states,
  on the harmful answer's differing tokens (the "logit lens").

Pairing: row i of the `train_dataset` goes with row i of the harmful dataset, joined by `core.views` on a
`repnoise_pair_index` row-id column, so shuffling, sharding and TRL's row filtering keep the pairs intact.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from trl import SFTTrainer

from ... import compat
from ...core.hooks import capture_outputs, gradient_checkpointing_disabled
from ...core.layers import get_decoder_layers, unwrap_model
from ...core.perturbation import needs_full_activations
from ...core.seeding import MicroBatchGenerators
from ...core.trainer import DefenseTrainerMixin
from ...core.views import RowAlignedCollator, RowAlignedView, add_row_ids, pop_view


logger = logging.getLogger(__name__)

PAIR_COLUMN = "repnoise_pair_index"
HARMFUL_PREFIX = "harmful_"  # batch keys of the paired harmful rows
_KERNEL_MUL = 2.0
_KERNEL_NUM = 5


def mmd_gaussian(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Biased MMD² between two sample sets `(n, D)` with RepNoise's multi-bandwidth Gaussian kernel.

    The base bandwidth is the mean squared distance over distinct pairs of the pooled samples (not differentiated, as
    in the original's `.data`); the 5 bandwidths are base · 2^(i−2), i = 0..4.
    """
    total = torch.cat([source, target], dim=0).float()
    n = total.size(0)
    squared = (total**2).sum(dim=1)
    distances = (squared[:, None] + squared[None, :] - 2 * total @ total.T).clamp(min=0)
    bandwidth = distances.detach().sum() / (n * n - n)
    bandwidth = bandwidth / _KERNEL_MUL ** (_KERNEL_NUM // 2)
    kernel = sum(torch.exp(-distances / (bandwidth * _KERNEL_MUL**i)) for i in range(_KERNEL_NUM))
    b = source.size(0)
    return (kernel[:b, :b] + kernel[b:, b:] - kernel[:b, b:] - kernel[b:, :b]).mean()


def differing_tokens(ids, attention_mask, other_ids, other_attention_mask) -> torch.Tensor:
    """True at real tokens of `ids` that differ from the paired sequence at the same position, or lie past its end.

    Both batches are right-padded, so position t of row i is token t of both sequences.
    """
    length = ids.size(1)
    aligned = torch.full_like(ids, -1)
    common = min(length, other_ids.size(1))
    aligned[:, :common] = other_ids[:, :common]
    other_lengths = other_attention_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(length, device=ids.device)[None, :]
    return ((ids != aligned) | (positions >= other_lengths)) & attention_mask.bool()


def _check_right_padded(attention_mask: torch.Tensor, role: str) -> None:
    lengths = attention_mask.sum(dim=1, keepdim=True)
    expected = torch.arange(attention_mask.size(1), device=attention_mask.device)[None, :] < lengths
    if not torch.equal(attention_mask.bool(), expected):
        raise ValueError(f"RepNoise needs right-padded {role} batches (it compares paired sequences by position).")


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of next-token `logits` `(N, V)` against `labels` `(N,)` (all valid)."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="mean")


class RepNoiseTrainer(DefenseTrainerMixin, SFTTrainer):
    """Drop-in [`~trl.SFTTrainer`] training RepNoise on paired data.

    `train_dataset` is the harmless (refusal) data and `harmful_dataset` the harmful answers to the same prompts, paired
    by row (row i with row i; the harmful dataset may be longer). See [`RepNoiseConfig`].
    """

    extra_datasets = ("harmful",)
    split_dependence = (
        "Its Gaussian target noise is drawn per micro-batch (seeded by rank, step and micro-batch index)."
    )
    unsupported_backends = {
        "fsdp": "the logit lens calls the final norm and LM head outside the model's forward; under FSDP2 their "
        "weights are DTensor shards there with accelerate 1.12 (measured; it passed with 1.15, docs/distributed.md).",
    }
    # The loss is a per-micro-batch mean (with a log), so Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False
    locates_layers = True

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, *positional, **kwargs):
        if train_dataset is not None:  # a `repnoise_pair_index` the user gave is kept: it chooses the pairs
            train_dataset = add_row_ids(train_dataset, "train_dataset", PAIR_COLUMN, keep_existing=True)
        super().__init__(model, args, data_collator, train_dataset, *positional, **kwargs)

    def _load_extra_dataset(self, role, dataset, args):
        dataset = super()._load_extra_dataset(role, dataset, args)
        return add_row_ids(dataset, f"{role}_dataset", PAIR_COLUMN, keep_existing=True)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        compat.extend_signature_columns(self, [PAIR_COLUMN])

    def setup_defense(self) -> None:
        args = self.args
        harmful = RowAlignedView(self.harmful_dataset, "harmful_dataset", PAIR_COLUMN)
        harmful.require(
            self.train_dataset,
            "train_dataset",
            "RepNoise pairs train_dataset row i with harmful_dataset row i and found no harmful partner for them. "
            "The harmful dataset is shorter, or its rows were dropped by truncation to `max_length`; give a harmful "
            "dataset with one row per train row.",
        )
        # The train loader then brings each batch's harmful partners, collated alike, under `harmful_*` keys
        self.data_collator = RowAlignedCollator(self.data_collator, {HARMFUL_PREFIX: harmful}, PAIR_COLUMN)
        base = unwrap_model(self.model)
        self._layers = list(get_decoder_layers(self.model, args.layers_path))
        self._mlps = []
        for index, layer in enumerate(self._layers):
            mlp = getattr(layer, args.mlp_attr, None)
            if not isinstance(mlp, torch.nn.Module):
                raise ValueError(
                    f"Decoder layer {index} ({type(layer).__name__}) has no MLP submodule `{args.mlp_attr}`; set "
                    "`mlp_attr` to its name."
                )
            self._mlps.append(mlp)
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        self._final_norm = getattr(decoder, args.final_norm_attr, None)
        if not isinstance(self._final_norm, torch.nn.Module):
            raise ValueError(
                f"Could not find the final norm `{args.final_norm_attr}` of {type(base).__name__}'s decoder (needed "
                "for RepNoise's logit lens); set `final_norm_attr`."
            )
        self._noise = MicroBatchGenerators(args.seed, self.accelerator.process_index)

    # --------------------------------------------------------------------------------------------------- helpers
    def _noise_generator(self, device) -> torch.Generator:
        """This micro-batch's generator (`core.seeding`): resumed runs draw the same noise, ranks different noise."""
        return self._noise.next(self.state.global_step, device)

    def _noise_loss(self, mlp_outputs, mask, device) -> torch.Tensor:
        generator = self._noise_generator(device)
        if not mask.any():  # nothing to push towards noise (and a zero bandwidth)
            return sum(hidden.sum() for hidden in mlp_outputs) * 0.0
        total = 0.0
        for hidden in mlp_outputs:
            keep = mask.unsqueeze(-1).to(hidden.dtype)
            hidden = hidden * keep
            noise = torch.randn(hidden.shape, generator=generator, device=device, dtype=torch.float32)
            noise = noise.to(hidden.dtype) * keep
            total = total + mmd_gaussian(hidden.flatten(1), noise.flatten(1))
        return total / len(mlp_outputs)

    def _harmful_loss(self, outputs, labels) -> torch.Tensor:
        """L̄_harm: CE of the final logits plus the logit-lens CE of every hidden state, over their number."""
        targets = labels[:, 1:]
        select = targets != -100
        targets = targets[select]
        if targets.numel() == 0:
            return outputs.logits.sum() * 0.0
        lm_head = unwrap_model(self.model).get_output_embeddings()
        total = masked_ce(outputs.logits[:, :-1][select], targets)
        for hidden in outputs.hidden_states:
            # The norm is per token, so projecting only the scored positions is exact
            total = total + masked_ce(lm_head(self._final_norm(hidden[:, :-1][select])), targets)
        return total / len(outputs.hidden_states)

    # ------------------------------------------------------------------------------------------------- the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if PAIR_COLUMN not in inputs:  # evaluation data is not paired: plain SFT loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        del inputs[PAIR_COLUMN]
        harmful = pop_view(inputs, HARMFUL_PREFIX)
        _check_right_padded(inputs["attention_mask"], "harmless")
        _check_right_padded(harmful["attention_mask"], "harmful")
        harmless_keep = differing_tokens(
            inputs["input_ids"], inputs["attention_mask"], harmful["input_ids"], harmful["attention_mask"]
        )
        harmful_keep = differing_tokens(
            harmful["input_ids"], harmful["attention_mask"], inputs["input_ids"], inputs["attention_mask"]
        )
        harmless_labels = inputs["labels"].masked_fill(~harmless_keep, -100)
        harmful_labels = harmful["labels"].masked_fill(~harmful_keep, -100)
        harmful_answer = harmful_labels != -100  # positions of the harmful answer's differing tokens
        alpha, beta = self.args.alpha, self.args.beta

        outputs = compat.fused_forward(
            model,
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=harmless_labels,
        )
        count = outputs.label_mask.sum()
        harmless_loss = -outputs.log_probs.sum() / count.clamp(min=1)
        loss = harmless_loss
        self.log_metric("harmless_loss", harmless_loss)

        if alpha != 0 or beta != 0:
            # MLP outputs of the harmful pass, for the MMD term (only the first call of each module is kept, so a
            # checkpoint recomputation cannot replace them)
            capture = capture_outputs(self._mlps) if beta else nullcontext([None] * len(self._mlps))
            # Under reentrant checkpointing, activations inside a layer are computed without grad; run this pass with
            # full activations so the MMD term gets its gradient
            full = beta != 0 and needs_full_activations(self._layers)
            with capture as mlp_outputs, gradient_checkpointing_disabled(self._layers) if full else nullcontext():
                harmful_outputs = model(
                    input_ids=harmful["input_ids"],
                    attention_mask=harmful["attention_mask"],
                    output_hidden_states=alpha != 0,
                    use_cache=False,
                )
            if alpha != 0:
                harmful_loss = self._harmful_loss(harmful_outputs, harmful_labels)
                loss = loss - alpha * torch.log(harmful_loss + 1)
                self.log_metric("harmful_loss", harmful_loss)
            if beta != 0:
                noise_loss = self._noise_loss(mlp_outputs, harmful_answer, harmful["input_ids"].device)
                loss = loss + beta * noise_loss
                self.log_metric("mmd_noise", noise_loss)
        return (loss, outputs) if return_outputs else loss
