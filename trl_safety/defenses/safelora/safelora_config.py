from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...core.config import DefenseConfigMixin, EffectiveIf, Range


SAFELORA_SELECTIONS = ("number", "threshold")
SAFELORA_PROJECTIONS = ("approximate", "exact")


@dataclass
class SafeLoRAConfig(DefenseConfigMixin):
    r"""
    Configuration of [`safelora_project`] and [`SafeLoRACallback`]: project the LoRA updates of the least aligned
    layers onto the alignment subspace spanned by `W_aligned − W_base`.

    SafeLoRA has no trainer, so this is a plain dataclass rather than a `trl.SFTConfig` subclass; each field carries
    its help in `metadata`, so [`~transformers.HfArgumentParser`] turns it into command-line flags
    (`trl-safety prune --defense safelora --num_proj_layers 10 ...`).

    Parameters:
        > Parameters that control the defense

        select_layers_type (`str`, *optional*, defaults to `"number"`):
            How projected layers are chosen: `"number"` projects the `num_proj_layers` LoRA modules whose update is
            least aligned (lowest cosine similarity between `C·ΔW` and `ΔW`); `"threshold"` projects every module
            with similarity ≤ `threshold`. Similarities are always computed on the unmodified adapter.
        num_proj_layers (`int`, *optional*, defaults to `10`):
            Number of LoRA modules projected in `"number"` mode (the IBM config default; the paper's per-experiment
            values are not published). `0` leaves the model unchanged.
        threshold (`float`, *optional*, defaults to `0.5`):
            Cosine-similarity cutoff of `"threshold"` mode. The similarity is ≥ 0 (C is positive semi-definite), so a
            negative threshold projects nothing.
        target_modules (`list[str]`, *optional*):
            Modules whose LoRA update may be projected, as PEFT's `target_modules` (name suffixes, or one regex on the
            full module name). All LoRA-adapted modules when unset.
        projection (`str`, *optional*, defaults to `"approximate"`):
            Projection matrix per module, with V = W_aligned − W_base: `"approximate"` is the official code's
            C = V·Vᵀ / ‖V‖_F; `"exact"` is the orthogonal projection V(VᵀV)⁺Vᵀ onto the column space of V. The exact
            projection is the identity when V has full row rank (a fully fine-tuned chat model), so it is only
            meaningful for low-rank alignment updates, e.g. aligned = base + a merged LoRA alignment adapter.
        projection_rtol (`float`, *optional*, defaults to `1e-4`):
            For `projection="exact"`: singular values of V below `projection_rtol × σ_max` count as zero (they are
            rounding noise of `W_aligned − W_base`).
    """

    ranges: ClassVar[dict[str, Range]] = {
        "num_proj_layers": Range(0),
        "threshold": Range(-1.0, 1.0),
        "projection_rtol": Range(0.0, 1.0, low_inclusive=False, high_inclusive=False),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "num_proj_layers": EffectiveIf(
            "select_layers_type='number'",
            lambda c: c.select_layers_type == "number",
            {"select_layers_type": "threshold"},
        ),
        "threshold": EffectiveIf(
            "select_layers_type='threshold'",
            lambda c: c.select_layers_type == "threshold",
            {"select_layers_type": "number"},
        ),
        "projection_rtol": EffectiveIf(
            "projection='exact'", lambda c: c.projection == "exact", {"projection": "approximate"}
        ),
    }

    select_layers_type: str = field(
        default="number",
        metadata={
            "help": "Layer selection: 'number' (the num_proj_layers least aligned LoRA modules) or 'threshold' "
            "(modules with cosine similarity <= threshold).",
            "choices": list(SAFELORA_SELECTIONS),
        },
    )
    num_proj_layers: int = field(
        default=10, metadata={"help": "Number of LoRA modules projected in 'number' mode (0: none)."}
    )
    threshold: float = field(
        default=0.5, metadata={"help": "Cosine-similarity cutoff of 'threshold' mode (negative: none)."}
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules whose LoRA update may be projected (name suffixes or a regex); all when unset."},
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

    def __post_init__(self):
        if self.select_layers_type not in SAFELORA_SELECTIONS:
            raise ValueError(
                f"`select_layers_type` must be one of {SAFELORA_SELECTIONS}, got {self.select_layers_type!r}."
            )
        if self.projection not in SAFELORA_PROJECTIONS:
            raise ValueError(f"`projection` must be one of {SAFELORA_PROJECTIONS}, got {self.projection!r}.")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        super().__post_init__()
