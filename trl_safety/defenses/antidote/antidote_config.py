from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...core.config import DefenseConfigMixin, EffectiveIf, HarmfulDataArguments, Range


ANTIDOTE_VARIANTS = ("wanda", "magnitude", "random")
ANTIDOTE_PRUNE_TARGETS = ("auto", "adapter", "weights")


_WANDA = EffectiveIf(
    "variant='wanda' (the only one that reads harmful data)", lambda c: c.variant == "wanda", {"variant": "magnitude"}
)


@dataclass
class AntidoteConfig(DefenseConfigMixin, HarmfulDataArguments):
    r"""
    Configuration of [`antidote_prune`] and [`AntidoteCallback`]: one-shot pruning of the weights most important for
    producing harmful answers, run after fine-tuning.

    Antidote has no trainer, so this is a plain dataclass rather than a `trl.SFTConfig` subclass; each field carries
    its help in `metadata`, so [`~transformers.HfArgumentParser`] turns it into command-line flags
    (`trl-safety prune --defense antidote --prune_ratio 0.1 ...`).

    Parameters:
        > Parameters that control the defense

        prune_ratio (`float`, *optional*, defaults to `0.1`):
            Fraction α of each output row of every scored weight matrix that is zeroed (the top-α weights by score).
            The official scripts use 0.1 (SST2), 0.05 (GSM8K and model sweeps) and 0.2 (dense-ratio sweep). `0`
            leaves the model unchanged.
        target_modules (`list[str]`, *optional*, defaults to `["q_proj", "k_proj", "v_proj"]`):
            Modules to prune, as PEFT's `target_modules`: a list of module-name suffixes, or one regular expression
            matched against the full module name. On a LoRA model the adapter factors (`lora_A`, `lora_B`) inside
            these modules are pruned; on a fully fine-tuned model their weight matrices.
        prune_target (`str`, *optional*, defaults to `"auto"`):
            What to prune: `"adapter"` (the active LoRA adapter's factors, as the official code does), `"weights"`
            (the targeted `nn.Linear` weights; for a PEFT model the frozen base weights, which `save_model` does not
            save), or `"auto"` (the adapter when the model carries a LoRA adapter on the targeted modules, the weights
            otherwise).
        variant (`str`, *optional*, defaults to `"wanda"`):
            Importance score: `"wanda"` (|W|·‖X‖ from a calibration pass over harmful data, the paper's method),
            `"magnitude"` (|W| alone, the official `sample_num=0` variant, needs no data) or `"random"` (a seeded
            random α fraction per row, the `random_prune` ablation).
        seed (`int`, *optional*, defaults to `42`):
            Seed of the `"random"` variant (an integer ≥ 0).

        > Parameters that control its data

        calibration_batch_size (`int`, *optional*, defaults to `1`):
            Harmful samples per calibration forward (the official value is 1). Padding tokens never enter the
            statistics, so larger batches give the same scores up to float rounding.
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            Calibration sequences (prompt + harmful answer) are truncated to this many tokens (keeping the start).
            `None` disables truncation.
        dataset_text_field (`str`, *optional*, defaults to `"text"`):
            Column holding the text of a language-modeling (`text`) harmful dataset.
        harmful_dataset_name (`str`, *optional*):
            Re-alignment set (harmful prompt → harmful answer), a Hub id or a local file/folder, used when no
            `harmful_dataset` is passed. The paper uses 2,000 BeaverTails unsafe samples disjoint from the attack data.
        harmful_dataset_config (`str`, *optional*):
            Configuration (subset) name of the harmful dataset.
        harmful_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the harmful dataset.
        harmful_num_samples (`int`, *optional*):
            Number of harmful samples used for calibration (the first ones; all when unset).
    """

    ranges: ClassVar[dict[str, Range]] = {
        "prune_ratio": Range(0.0, 1.0),
        "seed": Range(0),
        "calibration_batch_size": Range(1),
        "max_length": Range(1),
    }
    effective_if: ClassVar[dict[str, EffectiveIf]] = {
        "seed": EffectiveIf("variant='random'", lambda c: c.variant == "random", {"variant": "wanda"}),
        "calibration_batch_size": _WANDA,
        "max_length": _WANDA,
        "harmful_dataset_name": _WANDA,
        "harmful_num_samples": _WANDA,
    }

    prune_ratio: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of each output row of every scored weight matrix that is zeroed (top by score). 0 "
            "leaves the model unchanged."
        },
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
        metadata={
            "help": "Modules to prune, as PEFT's target_modules (name suffixes, or one regex on the full name). On a "
            "LoRA model their adapter factors are pruned, otherwise their weights."
        },
    )
    prune_target: str = field(
        default="auto",
        metadata={
            "help": "What to prune: 'adapter' (LoRA factors), 'weights' (the nn.Linear weights) or 'auto' (the "
            "adapter when there is one on the targeted modules, else the weights).",
            "choices": list(ANTIDOTE_PRUNE_TARGETS),
        },
    )
    variant: str = field(
        default="wanda",
        metadata={
            "help": "Importance score: 'wanda' (|W|·‖X‖ on harmful data), 'magnitude' (|W|, no data) or 'random' "
            "(seeded random ablation).",
            "choices": list(ANTIDOTE_VARIANTS),
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of the 'random' variant (an integer >= 0)."})
    calibration_batch_size: int = field(
        default=1,
        metadata={"help": "Harmful samples per calibration forward (1 in the official code; padding is excluded)."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Truncate calibration sequences (prompt + answer) to this many tokens; None disables it."},
    )
    dataset_text_field: str = field(
        default="text", metadata={"help": "Column holding the text of a language-modeling harmful dataset."}
    )

    def __post_init__(self):
        if self.variant not in ANTIDOTE_VARIANTS:
            raise ValueError(f"`variant` must be one of {ANTIDOTE_VARIANTS}, got {self.variant!r}.")
        if self.prune_target not in ANTIDOTE_PRUNE_TARGETS:
            raise ValueError(f"`prune_target` must be one of {ANTIDOTE_PRUNE_TARGETS}, got {self.prune_target!r}.")
        if not self.target_modules:
            raise ValueError("`target_modules` must name at least one module (e.g. ['q_proj', 'k_proj', 'v_proj']).")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        super().__post_init__()
