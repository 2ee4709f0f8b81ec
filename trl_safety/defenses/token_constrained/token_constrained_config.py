"""Configuration of token-wise constrained fine-tuning (Qi et al., ICLR 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import DefenseConfigMixin, EffectiveIf, Range


TOKEN_CONSTRAINED_REFERENCES = ("auto", "adapter_off", "copy")


@dataclass
class TokenConstrainedConfig(DefenseConfigMixin, SFTConfig):
    r"""
    Configuration class for the [`TokenConstrainedTrainer`].

    Token-wise constrained fine-tuning minimises `Σₜ −(2/βₜ) log σ(βₜ Δₜ)` with `Δₜ = log π_θ(yₜ) − log π_ref(yₜ)` and
    `π_ref` the model at the start of fine-tuning. As the official code does, the trainer optimises the same gradient
    as a re-weighted SFT loss `Σₜ wₜ · (−log π_θ(yₜ)) / N` with the detached weight `wₜ = max(2σ(−βₜΔₜ), min_weight)`
    (N is SFT's token count). `βₜ` depends on the position t of the response token: `β·first_token_bias_factor` for
    t = 1, `β·bias_factor` for 2 ≤ t ≤ `bias_length`, `β` after. All [`~trl.SFTConfig`] parameters are accepted as
    well; `packing` and `padding_free` are not supported (positions are counted per row).

    Parameters:
        > Parameters that control the defense

        beta (`float`, *optional*, defaults to `0.1`):
            Base β, used for positions after `bias_length` (official `--beta 0.1`). `0.0` turns the defense off: every
            weight is 1 and the trainer is then exactly [`~trl.SFTTrainer`] (the paper's β → 0 limit).
        bias_factor (`float`, *optional*, defaults to `20.0`):
            Multiplier of β on positions 2..`bias_length` (official 20, so βₜ = 2).
        first_token_bias_factor (`float`, *optional*, defaults to `5.0`):
            Multiplier of β on the first response token (official 5, so β₁ = 0.5: its loss starts high and the sigmoid
            would saturate quickly).
        bias_length (`int`, *optional*, defaults to `5`):
            Length L of the strongly constrained response prefix (official 5).
        min_weight (`float`, *optional*, defaults to `0.001`):
            Floor of the token weight (hard-coded 1e-3 in the official code).
        reference_mode (`str`, *optional*, defaults to `"auto"`):
            Where π_ref comes from. `"adapter_off"`: the PEFT model with its adapter disabled, one extra no-grad
            forward per step and no extra memory (needs an adapter that starts as a no-op, e.g. a fresh LoRA).
            `"copy"`: a frozen copy of the starting model (doubles the weight memory; full fine-tuning, or an adapter
            that does not start at zero). `"auto"` picks `"adapter_off"` for PEFT models and `"copy"` otherwise.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Set every dropout probability to 0 when the defense is on, as the official code does, so that Δₜ compares
            the two models and not two dropout masks.
    """

    ranges: ClassVar[dict[str, Range]] = {
        "beta": Range(0.0),
        "bias_factor": Range(0.0),
        "first_token_bias_factor": Range(0.0),
        "bias_length": Range(1),
        "min_weight": Range(0.0, 2.0),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        name: EffectiveIf("beta > 0 (0 turns the defense off)", lambda c: c.beta != 0, {"beta": 0.0})
        for name in ("bias_factor", "first_token_bias_factor", "bias_length", "min_weight")
    }

    beta: float = field(
        default=0.1,
        metadata={"help": "Base beta of the token-wise constraint (positions after bias_length). 0 disables it."},
    )
    bias_factor: float = field(
        default=20.0, metadata={"help": "Multiplier of beta on response positions 2..bias_length (official 20)."}
    )
    first_token_bias_factor: float = field(
        default=5.0, metadata={"help": "Multiplier of beta on the first response token (official 5)."}
    )
    bias_length: int = field(
        default=5, metadata={"help": "Length of the strongly constrained response prefix (official 5)."}
    )
    min_weight: float = field(default=1e-3, metadata={"help": "Floor of the per-token weight (official 1e-3)."})
    reference_mode: str = field(
        default="auto",
        metadata={
            "help": "Reference model: `adapter_off` (PEFT adapter disabled), `copy` (frozen copy of the starting "
            "model) or `auto` (adapter_off for PEFT models, copy otherwise).",
            "choices": list(TOKEN_CONSTRAINED_REFERENCES),
        },
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Set dropout to 0 while the defense is on (as the official code does)."}
    )

    def __post_init__(self):
        if self.reference_mode not in TOKEN_CONSTRAINED_REFERENCES:
            raise ValueError(
                f"`reference_mode` must be one of {', '.join(TOKEN_CONSTRAINED_REFERENCES)}, got {self.reference_mode!r}."
            )
        super().__post_init__()
