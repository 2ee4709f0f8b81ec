"""Configuration of the Antibody fine-tuning-stage defense (per-sample likelihood-ratio weighting)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import DefenseConfigMixin, Range


@dataclass
class AntibodyConfig(DefenseConfigMixin, SFTConfig):
    r"""
    Configuration class for the [`AntibodyTrainer`].

    Antibody's fine-tuning stage weights every sample of a micro-batch by how much more the model likes refusing its
    prompt than giving its answer: `w = softmax((NLL̄(refusal) − NLL̄(answer)) / τ)` over the micro-batch, with NLL̄ a
    token-mean negative log-likelihood; the loss is the weighted token mean `Σᵢ wᵢ Σₜ CEᵢₜ / Σᵢ wᵢ Nᵢ`. An aligned
    model refuses harmful prompts, so harmful samples get little weight. All [`~trl.SFTConfig`] parameters are accepted
    as well; `packing` and `padding_free` are not supported (each sample needs its own row).

    Parameters:
        > Parameters that control the defense

        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature τ of the weights (official value 1.0). `inf` gives uniform weights: the trainer is then
            [`~trl.SFTTrainer`] with a per-micro-batch token mean (exactly SFT at `gradient_accumulation_steps=1`).
            The weights are normalised per micro-batch, so their effect depends on the batch size (official: 16).

        > Parameters that control its data

        refusals_file (`str`, *optional*):
            A text file with one refusal per line, assigned round-robin to the samples by row index. When unset, the
            pool shipped with `trl_safety` (100 generic refusals, `trl_safety.data.refusals`) is used.
        harmful_flag_column (`str`, *optional*, defaults to `"is_harmful"`):
            Optional boolean column of the training data marking harmful samples. It is used only for logging the
            weight share of harmful samples (`antibody/harmful_weight_share`), as in the official code.
    """

    # inf is documented: uniform weights, i.e. plain SFT
    ranges: ClassVar[dict[str, Range]] = {"temperature": Range(0.0, low_inclusive=False, allow_inf=True)}

    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature tau of the per-sample weights. inf gives uniform weights (plain SFT)."},
    )
    refusals_file: str | None = field(
        default=None,
        metadata={
            "help": "Text file with one refusal per line, assigned round-robin by row. Default: the shipped pool."
        },
    )
    harmful_flag_column: str = field(
        default="is_harmful",
        metadata={"help": "Optional boolean column flagging harmful samples, used only to log their weight share."},
    )
