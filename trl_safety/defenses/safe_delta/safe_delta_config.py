from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...core.config import AlignmentDataArguments, DefenseConfigMixin, Range


SAFE_DELTA_NON_LINEAR = ("aligned", "finetuned")


@dataclass
class SafeDeltaConfig(DefenseConfigMixin, AlignmentDataArguments):
    r"""
    Configuration of [`safe_delta`] and [`SafeDeltaCallback`]: per decoder-layer `nn.Linear`, keep the fine-tuned
    delta entries W_f − W_a that fit a safety budget under the OBS cost (W_f,ij − W_ij)²/d_j² (d_j the diagonal of
    the upper Cholesky factor of H⁻¹, H the damped input Hessian of the *aligned* layer on safety data), and
    compensate the entries left at their aligned value (SparseGPT-style updates of the later columns).

    Safe Delta has no trainer, so this is a plain dataclass; each field's help becomes a command-line flag
    (`trl-safety prune --defense safe-delta --scale 0.11 ...`). Defaults are the official code's
    (`run_safedelta.py`, `safedelta_runner.py`; see `docs/safe_delta.md`).

    Parameters:
        > Parameters that control the defense

        scale (`float`, *optional*, defaults to `0.1`):
            s, the safety budget: per block of `block_size` columns the budget is mean(r)·s·(block_size /
            budget_ref_dim)·(d_out / budget_ref_dim), r_j = 1/d_j². 0.1 is the official default (Dirty Summary),
            0.11 the PureBad-100 script's value. `0.0` selects no delta (the aligned Linear weights); `inf` with
            `exclude_ratio=0` selects every delta.
        exclude_ratio (`float`, *optional*, defaults to `0.15`):
            Fraction of each block's entries, those of the most sensitive columns (largest r), that are never
            selected (hard-coded 15% in the official code). An exclusion count of 0 excludes nothing.
        percdamp (`float`, *optional*, defaults to `0.01`):
            Damping: H += percdamp·mean(diag H)·I before inversion.
        block_size (`int`, *optional*, defaults to `2048`):
            Columns per selection block (the budget and the mask are computed per block).
        sub_block (`int`, *optional*, defaults to `4`):
            Columns per lazy compensation batch inside a block (same result up to rounding; speed only).
        budget_ref_dim (`int`, *optional*, defaults to `4096`):
            The official normalisation dimension of the budget (the 4096 hidden size of Llama-2-7B).
        target_modules (`list[str]`, *optional*):
            The Linear modules processed, as PEFT's `target_modules` (name suffixes or one regex). Unset: every
            `nn.Linear` inside the decoder layers (q, k, v, o, gate, up, down on Llama), as the official code.
            Modules outside the decoder layers (the LM head) cannot be targets: their calibration input is not seen.
        non_linear_params (`str`, *optional*, defaults to `"aligned"`):
            What every parameter that is not a processed Linear weight (embeddings, norms, LM head, biases) becomes:
            `"aligned"` (its aligned value: the official code returns the aligned model with modified Linears, so
            the fine-tuned changes to these are discarded) or `"finetuned"` (its fine-tuned value is kept).

        > Parameters that control its data

        alignment_dataset_name (`str`, *optional*):
            The safety calibration set (harmful prompt → the aligned model's safe answer; the official one is 128
            self-generated answers). The bench passes its harmful → refusal rows instead; `safe_delta` and
            `SafeDeltaCallback` take a dataset object as `safety_dataset`.
        calibration_batch_size (`int`, *optional*, defaults to `1`):
            Sequences per calibration forward (padding never enters H).
        max_length (`int` or `None`, *optional*, defaults to `None`):
            Truncate calibration sequences to this many tokens (the official `seq_len=512` is passed but unused).
        dataset_text_field (`str`, *optional*, defaults to `"text"`):
            Column holding the text of a language-modeling safety dataset.
    """

    ranges: ClassVar[dict[str, Range]] = {
        "scale": Range(0.0, allow_inf=True),
        "exclude_ratio": Range(0.0, 1.0, high_inclusive=False),
        "percdamp": Range(0.0),
        "block_size": Range(1),
        "sub_block": Range(1),
        "budget_ref_dim": Range(1),
        "calibration_batch_size": Range(1),
        "max_length": Range(1),
    }

    scale: float = field(
        default=0.1,
        metadata={"help": "Safety budget s (official 0.1; 0.11 for PureBad). 0: aligned Linears; inf: every delta."},
    )
    exclude_ratio: float = field(
        default=0.15,
        metadata={"help": "Fraction of each block's entries (most sensitive columns) never selected (official 0.15)."},
    )
    percdamp: float = field(default=0.01, metadata={"help": "Hessian damping: H += percdamp·mean(diag H)·I."})
    block_size: int = field(default=2048, metadata={"help": "Columns per selection block (official 2048)."})
    sub_block: int = field(default=4, metadata={"help": "Columns per lazy compensation batch (speed only)."})
    budget_ref_dim: int = field(
        default=4096, metadata={"help": "Normalisation dimension of the budget (official 4096)."}
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Linear modules processed (name suffixes or a regex); unset: every nn.Linear in the decoder "
            "layers."
        },
    )
    non_linear_params: str = field(
        default="aligned",
        metadata={
            "help": "Value of every other parameter (embeddings, norms, LM head): 'aligned' (official) or "
            "'finetuned'.",
            "choices": list(SAFE_DELTA_NON_LINEAR),
        },
    )
    calibration_batch_size: int = field(
        default=1, metadata={"help": "Safety sequences per calibration forward (padding is excluded)."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Truncate calibration sequences to this many tokens; None: no truncation."}
    )
    dataset_text_field: str = field(
        default="text", metadata={"help": "Column holding the text of a language-modeling safety dataset."}
    )

    def __post_init__(self):
        if self.non_linear_params not in SAFE_DELTA_NON_LINEAR:
            raise ValueError(
                f"`non_linear_params` must be one of {SAFE_DELTA_NON_LINEAR}, got {self.non_linear_params!r}."
            )
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("`target_modules` must name at least one module, or be unset (every decoder Linear).")
        super().__post_init__()

    @property
    def is_neutral(self) -> bool:
        """Every delta selected and every other parameter fine-tuned: the result is the fine-tuned model."""
        return self.scale == float("inf") and self.exclude_ratio == 0 and self.non_linear_params == "finetuned"
