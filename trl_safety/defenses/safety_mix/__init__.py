"""Safety-data mixing baseline (Vlguard / SafeInstr): λ·CE on an alignment batch added to every user micro-batch."""

from ...registry import DefenseSpec, register_defense
from .safety_mix_config import SafetyMixConfig
from .safety_mix_trainer import SafetyMixTrainer


register_defense(
    DefenseSpec(
        name="safety-mix",
        stage="fine-tuning",
        config_class=SafetyMixConfig,
        trainer_class=SafetyMixTrainer,
        description="Adds lambda * CE on a batch of alignment (refusal) data to every user micro-batch.",
        # λ=1 and batch 4 carry over unchanged: the term is a token-mean CE like the user loss, so its scale does not
        # depend on the model size.
        bench_overrides={},
    )
)

__all__ = ["SafetyMixConfig", "SafetyMixTrainer"]
