from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import AlignmentDataArguments, DefenseConfigMixin, EffectiveIf, Range


SAFEGRAD_ALIGNMENT_LOSSES = ("kl", "ce")

_ACTIVE = EffectiveIf(
    "project_gradients=True or alignment_weight > 0 (otherwise no alignment gradient is taken)",
    lambda c: c.project_gradients or c.alignment_weight != 0,
    {"project_gradients": False, "alignment_weight": 0.0},
)
_PROJECT = EffectiveIf("project_gradients=True", lambda c: c.project_gradients, {"project_gradients": False})


@dataclass
class SafeGradConfig(DefenseConfigMixin, AlignmentDataArguments, SFTConfig):
    r"""
    Configuration class for the [`SafeGradTrainer`].

    SafeGrad (fine-tuning stage) de-conflicts the user-task gradient `g_u` from an alignment gradient `g_a` once per
    optimizer step: if `⟨g_u, g_a⟩ < 0`, `g_u′ = g_u − (⟨g_u, g_a⟩/‖g_a‖²)·g_a` (the projection onto the plane
    orthogonal to `g_a`), else `g_u′ = g_u`; the step then uses `g_u′ + λ_a·g_a`. `g_a` is the gradient of the KL
    divergence from the reference model (the weights fine-tuning starts from) on a batch of alignment data. The paper
    publishes no code and no hyperparameters here: every default below is ours (docs/safegrad.md). All
    [`~trl.SFTConfig`] parameters are accepted as well.

    Parameters:
        > Parameters that control the defense

        project_gradients (`bool`, *optional*, defaults to `True`):
            Project the user gradient away from the alignment gradient when they conflict.
            `project_gradients=False` with `alignment_weight=0` turns the defense off (the trainer is then exactly
            [`~trl.SFTTrainer`]); `project_gradients=True` with `alignment_weight=0` is the projection-only ablation.
        alignment_weight (`float`, *optional*, defaults to `1.0`):
            Weight λ_a of the alignment gradient added to the (projected) user gradient (ours: PCGrad's sum of the
            de-conflicted gradients).
        alignment_loss (`str`, *optional*, defaults to `"kl"`):
            `"kl"`: token-mean KL(π_ref ‖ π_θ) over the answer tokens of the alignment batch, full vocabulary,
            teacher-forced, π_ref the weights at the start of training (the paper's distributional alignment signal).
            `"ce"`: token-mean cross-entropy on the alignment answers (no reference model; `g_a ≠ 0` from step 0).
        min_alignment_grad_ratio (`float`, *optional*, defaults to `1e-8`):
            The projection is skipped when `‖g_a‖ ≤ ratio·‖g_u‖`. With `alignment_loss="kl"` the first step starts at
            the reference, where the KL and `g_a` are exactly zero, and the projection would divide by `‖g_a‖² = 0`.

        > Parameters that control its data

        alignment_batch_size (`int`, *optional*, defaults to `8`):
            Per-device batch size of the alignment batch drawn once per optimizer step (ours: SFTConfig's default
            per-device train batch size).
        alignment_dataset_name (`str` or `None`, *optional*, defaults to `None`):
            Alignment dataset (harmful prompt → refusal) used when the trainer is not given `alignment_dataset=`.
    """

    ranges: ClassVar[dict[str, Range]] = {
        "alignment_weight": Range(0.0),
        "min_alignment_grad_ratio": Range(0.0),
        "alignment_batch_size": Range(1),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "alignment_loss": _ACTIVE,
        "alignment_batch_size": _ACTIVE,
        "min_alignment_grad_ratio": _PROJECT,
    }

    project_gradients: bool = field(
        default=True,
        metadata={
            "help": "Project the user gradient onto the plane orthogonal to the alignment gradient when they "
            "conflict. project_gradients=False and alignment_weight=0 is plain SFT."
        },
    )
    alignment_weight: float = field(
        default=1.0, metadata={"help": "Weight λ_a of the alignment gradient added to the (projected) user gradient."}
    )
    alignment_loss: str = field(
        default="kl",
        metadata={
            "help": "Alignment signal: 'kl' (KL from the starting weights on the alignment answers) or 'ce' "
            "(cross-entropy on the alignment answers).",
            "choices": list(SAFEGRAD_ALIGNMENT_LOSSES),
        },
    )
    min_alignment_grad_ratio: float = field(
        default=1e-8,
        metadata={"help": "Skip the projection when ||g_a|| <= ratio * ||g_u|| (g_a is zero at the reference)."},
    )
    alignment_batch_size: int = field(
        default=8, metadata={"help": "Per-device batch size of the alignment batch drawn once per optimizer step."}
    )

    def __post_init__(self):
        if self.alignment_loss not in SAFEGRAD_ALIGNMENT_LOSSES:
            raise ValueError(
                f"`alignment_loss` must be one of {SAFEGRAD_ALIGNMENT_LOSSES}, got {self.alignment_loss!r}."
            )
        if self.fp16 and (self.project_gradients or self.alignment_weight != 0):
            # fp16's loss scaler leaves `.grad` scaled until the optimizer step; the surgery reads and adds to it
            raise ValueError("SafeGrad does not support `fp16=True` (scaled gradients); use `bf16=True` or fp32.")
        super().__post_init__()
