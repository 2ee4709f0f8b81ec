from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...core.config import DefenseConfigMixin, EffectiveIf, Range


LOX_SVDS = ("exact", "lowrank")


@dataclass
class LoXConfig(DefenseConfigMixin):
    r"""
    Configuration of [`lox_extrapolate`] and [`LoXCallback`]: extrapolate the aligned model along the top-`rank`
    subspace of its alignment update, W_LoX = W_aligned + α·Proj_k(ΔW_align) with ΔW_align = W_aligned − W_base and
    Proj_k the rank-k truncated SVD.

    LoX has no trainer, so this is a plain dataclass; each field carries its help in `metadata`, so
    [`~transformers.HfArgumentParser`] turns it into command-line flags
    (`trl-safety prune --defense lox --rank 6 --alpha 0.5 ...`).

    Parameters:
        > Parameters that control the defense

        rank (`int`, *optional*, defaults to `0`):
            k, the number of singular directions of ΔW_align that are extrapolated. `0` means full rank (α·ΔW_align
            is added whole), the official script's default (`--k 0`); `rank` ≥ the rank of ΔW_align is the same.
        alpha (`float`, *optional*, defaults to `1.0`):
            α, the extrapolation factor (the official `--coef` default). `0.0` leaves the model unchanged.
        target_modules (`list[str]`, *optional*):
            Modules whose weight is extrapolated, as PEFT's `target_modules` (name suffixes, or one regex on the full
            module name). Unset: every LoRA module of an alignment adapter, or, for a dense aligned model, every 2-D
            weight — embeddings and LM head included, as the official code does; 1-D tensors (norms, biases) are
            never changed.
        svd (`str`, *optional*, defaults to `"exact"`):
            SVD of a dense ΔW_align for `rank` > 0: `"exact"` (`torch.linalg.svd`, what the official code runs) or
            `"lowrank"`, a randomized SVD (`torch.svd_lowrank` with `rank + 10` columns and 4 power iterations, seeded:
            the same result on every rank and run), much faster for small `rank` on large matrices but approximate:
            its error is of the order of the singular values past `rank + 10`. Adapters never need it.
    """

    ranges: ClassVar[dict[str, Range]] = {"rank": Range(0), "alpha": Range(0.0)}
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "svd": EffectiveIf("rank > 0", lambda c: c.rank > 0, {"rank": 0}),
    }

    rank: int = field(
        default=0, metadata={"help": "k: singular directions of the alignment update extrapolated (0: full rank)."}
    )
    alpha: float = field(default=1.0, metadata={"help": "Extrapolation factor alpha (0: model unchanged)."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules extrapolated (name suffixes or a regex); unset: every LoRA module of an adapter, or "
            "every 2-D weight of a dense model (embeddings and LM head included)."
        },
    )

    svd: str = field(
        default="exact",
        metadata={
            "help": "Dense SVD for rank > 0: 'exact' (official) or 'lowrank' (randomized, faster, approximate).",
            "choices": list(LOX_SVDS),
        },
    )

    def __post_init__(self):
        if self.svd not in LOX_SVDS:
            raise ValueError(f"`svd` must be one of {LOX_SVDS}, got {self.svd!r}.")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        super().__post_init__()
