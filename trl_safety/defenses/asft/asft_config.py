from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import DefenseConfigMixin, EffectiveIf, Range
from ..safelora.safelora_config import SAFELORA_PROJECTIONS


@dataclass
class AsFTConfig(DefenseConfigMixin, SFTConfig):
    r"""
    Configuration class for the [`AsFTTrainer`].

    AsFT (fine-tuning stage) adds to the SFT loss a penalty on the part of each targeted module's update that leaves
    the alignment direction V = W_aligned − W_base: `loss = CE + λ · Σ_m ‖(I − Ĉ_m)·ΔW_m‖_F²`, counted once per
    optimizer step. Under LoRA ΔW = B·A (or s·B·A); under full fine-tuning ΔW = W − W_start. W_aligned is the model
    being fine-tuned as it is given to the trainer, W_base a base model passed as `base_model=` or named by
    `base_model_name_or_path`. All [`~trl.SFTConfig`] parameters are accepted as well.

    Parameters:
        > Parameters that control the defense

        asft_lambda (`float`, *optional*, defaults to `1.0`):
            Weight λ of the anchoring penalty (`--lambda_reg 1` in every official script). `0.0` turns the defense off
            (the trainer is then exactly [`~trl.SFTTrainer`]; no alignment matrix is computed).
        projection (`str`, *optional*, defaults to `"approximate"`):
            Ĉ per module: `"approximate"` is the official code's Ĉ = V·Vᵀ / ‖V‖_F (not a projector: its eigenvalues are
            σ_i²/‖V‖_F); `"exact"` is the orthogonal projector U_k·U_kᵀ onto the column space of V (the identity when V
            has full row rank, so only meaningful for a low-rank alignment update).
        projection_rtol (`float`, *optional*, defaults to `1e-4`):
            For `projection="exact"`: singular values of V below `projection_rtol × σ_max` count as zero.
        scale_by_lora_scaling (`bool`, *optional*, defaults to `False`):
            `False` penalises B·A as the official code does; `True` penalises the real update s·B·A
            (s = lora_alpha / r), i.e. λ is multiplied by s². No effect under full fine-tuning.
        target_modules (`list[str]`, *optional*):
            Modules regularised (PEFT-style name suffixes, or one regex on the full module name). Unset: every module
            with an active LoRA adapter (the official q_proj and v_proj when those are the LoRA targets) or, under full
            fine-tuning, every trainable `nn.Linear` except the output head.

        > Parameters that control its data

        base_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            The unaligned base model (local folder, Hub id, `smollm2`, or an adapter folder merged onto its base),
            used when the trainer is not given `base_model=`. Only V is kept after set-up.
    """

    ranges: ClassVar[dict[str, Range]] = {
        "asft_lambda": Range(0.0),
        "projection_rtol": Range(0.0, 1.0, low_inclusive=False, high_inclusive=False),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "projection_rtol": EffectiveIf(
            "projection='exact'", lambda c: c.projection == "exact", {"projection": "approximate"}
        ),
    }

    asft_lambda: float = field(
        default=1.0,
        metadata={"help": "Weight lambda of the anchoring penalty (official scripts: 1). 0 disables the defense."},
    )
    projection: str = field(
        default="approximate",
        metadata={
            "help": "'approximate': C = V V^T / ||V||_F (official code); 'exact': orthogonal projection onto the "
            "column space of V = W_aligned - W_base.",
            "choices": list(SAFELORA_PROJECTIONS),
        },
    )
    projection_rtol: float = field(
        default=1e-4,
        metadata={"help": "Exact projection: singular values below rtol * max count as zero (rounding noise)."},
    )
    scale_by_lora_scaling: bool = field(
        default=False,
        metadata={"help": "Penalise s*B*A (the real LoRA update) instead of B*A as the official code does."},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules regularised (name suffixes or a regex); the LoRA modules (full FT: every Linear but "
            "the output head) when unset."
        },
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Unaligned base model (folder, Hub id or smollm2), when `base_model=` is not given."},
    )

    def __post_init__(self):
        if self.projection not in SAFELORA_PROJECTIONS:
            raise ValueError(f"`projection` must be one of {SAFELORA_PROJECTIONS}, got {self.projection!r}.")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        super().__post_init__()
