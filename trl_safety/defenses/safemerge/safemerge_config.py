from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...core.config import DefenseConfigMixin, EffectiveIf, Range


SAFEMERGE_MERGES = ("peft_linear", "delta")
SAFEMERGE_PROJECTIONS = ("approximate", "exact")


@dataclass
class SafeMERGEConfig(DefenseConfigMixin):
    r"""
    Configuration of [`safemerge`] and [`SafeMERGECallback`]: merge the fine-tuned LoRA update with a safety LoRA
    adapter, module by module, only where the update leaves the alignment subspace (cosine similarity below
    `threshold`).

    SafeMERGE has no trainer, so this is a plain dataclass; each field carries its help in `metadata`, so
    [`~transformers.HfArgumentParser`] turns it into command-line flags
    (`trl-safety prune --defense safemerge --safety_adapter safety-lora/ --threshold 0.35 ...`).

    Parameters:
        > Parameters that control the defense

        safety_adapter (`str`, *optional*):
            The safety LoRA adapter: a PEFT adapter folder trained on safety data on the same model as the fine-tuned
            adapter, or the name of an adapter already loaded on the fine-tuned `PeftModel`. Unset: the merge partner
            is the aligned model itself (a zero safety adapter), so a merged module keeps `finetuned_weight`·ΔW_ft.
        threshold (`float`, *optional*, defaults to `0.35`):
            τ: a module is merged when cos(C·ΔW_ft, ΔW_ft) < τ (strict, rounded to 5 decimals as the official code).
            The official CLI default. The similarity lies in [−1, 1], so `-1.0` merges nothing.
        finetuned_weight (`float`, *optional*, defaults to `0.8`):
            w_ft, the weight of the fine-tuned adapter in a merged module.
        safety_weight (`float`, *optional*, defaults to `0.2`):
            w_safe, the weight of the safety adapter in a merged module. With `finetuned_weight=1` and
            `safety_weight=0` the model is left unchanged.
        merge (`str`, *optional*, defaults to `"peft_linear"`):
            `"peft_linear"`: what the official code runs (PEFT's factor-wise "linear" combination, A = Σ √(w_i s_i) A_i,
            B = Σ √(w_i s_i) B_i), whose ΔW has cross terms √(w_ft w_safe s_ft s_safe)·(B_ft A_safe + B_safe A_ft);
            needs equal ranks. `"delta"`: the exact weighted sum w_ft ΔW_ft + w_safe ΔW_safe, stored as a rank
            r_ft + r_safe adapter in the merged modules.
        target_modules (`list[str]`, *optional*):
            Modules that may be merged, as PEFT's `target_modules` (name suffixes, or one regex on the full module
            name). All LoRA-adapted modules when unset.
        projection (`str`, *optional*, defaults to `"approximate"`):
            C per module from V = W_aligned − W_base: `"approximate"` is the official C = V·Vᵀ/‖V‖_F, `"exact"` the
            orthogonal projection onto the column space of V (as SafeLoRA's option).
        projection_rtol (`float`, *optional*, defaults to `1e-4`):
            For `projection="exact"`: singular values of V below `projection_rtol × σ_max` count as zero.
    """

    ranges: ClassVar[dict[str, Range]] = {
        "threshold": Range(-1.0, 1.0),
        "finetuned_weight": Range(0.0),
        "safety_weight": Range(0.0),
        "projection_rtol": Range(0.0, 1.0, low_inclusive=False, high_inclusive=False),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "projection_rtol": EffectiveIf(
            "projection='exact'", lambda c: c.projection == "exact", {"projection": "approximate"}
        ),
    }

    safety_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Safety LoRA adapter folder (or the name of an adapter loaded on the model); unset: the aligned "
            "model itself is the merge partner (zero safety adapter)."
        },
    )
    threshold: float = field(
        default=0.35, metadata={"help": "Merge a module when its cosine similarity is < threshold (-1: none)."}
    )
    finetuned_weight: float = field(default=0.8, metadata={"help": "Weight of the fine-tuned adapter when merged."})
    safety_weight: float = field(default=0.2, metadata={"help": "Weight of the safety adapter when merged."})
    merge: str = field(
        default="peft_linear",
        metadata={
            "help": "'peft_linear': PEFT's factor-wise linear merge (official code, has cross terms); 'delta': the "
            "exact weighted sum of the updates (rank r_ft + r_safe).",
            "choices": list(SAFEMERGE_MERGES),
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that may be merged (name suffixes or a regex); all LoRA modules when unset."},
    )
    projection: str = field(
        default="approximate",
        metadata={
            "help": "'approximate': C = V V^T / ||V||_F (official code); 'exact': orthogonal projection onto the "
            "column space of V = W_aligned - W_base.",
            "choices": list(SAFEMERGE_PROJECTIONS),
        },
    )
    projection_rtol: float = field(
        default=1e-4,
        metadata={"help": "Exact projection: singular values below rtol * max count as zero (rounding noise)."},
    )

    def __post_init__(self):
        if self.merge not in SAFEMERGE_MERGES:
            raise ValueError(f"`merge` must be one of {SAFEMERGE_MERGES}, got {self.merge!r}.")
        if self.projection not in SAFEMERGE_PROJECTIONS:
            raise ValueError(f"`projection` must be one of {SAFEMERGE_PROJECTIONS}, got {self.projection!r}.")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        super().__post_init__()
