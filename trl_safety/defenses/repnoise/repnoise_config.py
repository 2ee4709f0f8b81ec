"""Configuration of the RepNoise (Representation Noising) alignment-stage defense."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig

from ...core.config import DefenseConfigMixin, HarmfulDataArguments, Range


@dataclass
class RepNoiseConfig(DefenseConfigMixin, HarmfulDataArguments, SFTConfig):
    r"""
    Configuration class for the [`RepNoiseTrainer`].

    RepNoise minimises L = L_harmless + β · MMD_noise − α · log(L̄_harm + 1) on paired batches: row i of the
    `train_dataset` (harmful prompt → refusal) and row i of the harmful dataset (same prompt → harmful answer). All
    [`~trl.SFTConfig`] parameters are accepted as well.

    Parameters:
        > Parameters that control the defense

        alpha (`float`, *optional*, defaults to `0.1`):
            Weight α of the harmful-loss ascent term −α · log(L̄_harm + 1) (`--rho` in the Booster/Antidote scripts).
        beta (`float`, *optional*, defaults to `0.001`):
            Weight β of the noise term: the MMD between the harmful batch's MLP outputs and Gaussian noise, averaged
            over decoder layers (`--lamb` in the Booster/Antidote scripts).
        mlp_attr (`str`, *optional*, defaults to `"mlp"`):
            Name of the MLP submodule of a decoder layer (its output is pushed towards noise).
        final_norm_attr (`str`, *optional*, defaults to `"norm"`):
            Name of the final norm of the decoder (`model.get_decoder().<final_norm_attr>`), used by the logit lens.
        layers_path (`str`, *optional*, defaults to `None`):
            Dotted path from the model to its decoder-layer list, when it cannot be found structurally.

        > Parameters that control its data

        harmful_dataset_name (`str`, *optional*, defaults to `None`):
            Harmful dataset paired row by row with the `train_dataset`: row i holds the harmful answer to the prompt
            of `train_dataset` row i. Required (as `harmful_dataset=` or this field); there is no default because
            the pairing only holds for a harmful set built from the same rows as the refusals.

    With α = β = 0 the loss is the cross-entropy of the refusals on the tokens where they differ from the paired
    harmful sequence: it is *not* plain SFT. Packing and padding-free batches are not supported (the pairing compares
    token positions).
    """

    ranges: ClassVar[dict[str, Range]] = {"alpha": Range(0.0), "beta": Range(0.0)}

    alpha: float = field(
        default=0.1,
        metadata={"help": "Weight alpha of the harmful-loss ascent term -alpha * log(harmful loss + 1)."},
    )
    beta: float = field(
        default=0.001,
        metadata={"help": "Weight beta of the MMD between harmful MLP outputs and Gaussian noise."},
    )
    mlp_attr: str = field(default="mlp", metadata={"help": "Name of the MLP submodule of a decoder layer."})
    final_norm_attr: str = field(
        default="norm", metadata={"help": "Name of the decoder's final norm (used by the logit lens)."}
    )
    layers_path: str | None = field(
        default=None,
        metadata={"help": "Dotted path to the decoder-layer list, when it cannot be found structurally."},
    )

    def __post_init__(self):
        if self.packing or self.padding_free:
            raise ValueError(
                "RepNoise compares paired harmful and harmless sequences token by token, so `packing` and "
                "`padding_free` are not supported. Set both to False."
            )
        super().__post_init__()
