"""A minimal defense, defined only for the tests: registering it is all it takes to be checked by the contract matrix
(`tests/test_defense_contract.py`). It shows the smallest complete defense (docs/design/adding_a_defense.md).

The "defense" adds λ·‖θ‖² over the trainable parameters to the loss of every optimizer step (an L2 pull towards 0;
not a real safety method). λ = 0 is the plain `SFTTrainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import SFTConfig, SFTTrainer

from trl_safety.core import DefenseTrainerMixin
from trl_safety.core.config import DefenseConfigMixin, Range
from trl_safety.core.weight_perturbation import extra_term_scale
from trl_safety.registry import DefenseSpec


@dataclass
class ExampleConfig(DefenseConfigMixin, SFTConfig):
    r"""
    Configuration class for the [`ExampleTrainer`]: the SFT loss plus λ·‖θ‖² per optimizer step.

    Parameters:
        l2_strength (`float`, *optional*, defaults to `0.01`):
            λ, the weight of ‖θ‖² (trainable parameters). `0.0` turns the defense off.
    """

    ranges: ClassVar[dict[str, Range]] = {"l2_strength": Range(0.0, 10.0)}

    l2_strength: float = field(
        default=0.01,
        metadata={
            "help": "lambda: weight of the squared norm of the trainable parameters, in [0, 10]. 0 disables it."
        },
    )


class ExampleTrainer(DefenseTrainerMixin, SFTTrainer):
    """`SFTTrainer` whose loss gains λ·‖θ‖²; its identity (name, stage, title, paper) comes from the spec below."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        strength = self.args.l2_strength
        if strength == 0:  # strength zero: exactly SFT's computation
            return result
        loss, outputs = result if return_outputs else (result, None)
        params = [p for p in model.parameters() if p.requires_grad]
        penalty = sum((p.float() ** 2).sum() for p in params)
        self.log_metric("l2_term", strength * penalty)  # logged as `example-l2/l2_term`
        # SFT's loss is already divided for gradient accumulation: a per-micro-batch term must be divided once too
        loss = loss + strength * penalty * extra_term_scale(self, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


EXAMPLE_SPEC = DefenseSpec(
    name="example-l2",
    stage="fine-tuning",
    config_class=ExampleConfig,
    trainer_class=ExampleTrainer,
    title="Example L2",
    paper={"title": "An example defense for the test suite", "id": "0000.00000", "citation": "@misc{example}"},
    description="Test-only example: SFT plus an L2 penalty on the trainable parameters.",
    neutral_overrides={"l2_strength": 0.0},
)
