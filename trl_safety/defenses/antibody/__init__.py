"""Antibody, fine-tuning stage: per-sample likelihood-ratio weighting (refusal vs answer) inside each batch."""

import math

from ...registry import DefenseSpec, register_defense
from .antibody_config import AntibodyConfig
from .antibody_trainer import AntibodyTrainer


# One paper for both stages; the alignment stage (`defenses/antibody_align`) cites it from here
PAPER = {
    "title": "Antibody: Strengthening Defense Against Harmful Fine-Tuning for Large Language Models via "
    "Attenuating Harmful Gradient Influence",
    "id": "2603.00498",
    "citation": """\
@inproceedings{nguyen2026antibody,
    title        = {{Antibody: Strengthening Defense Against Harmful Fine-Tuning for Large Language Models via Attenuating Harmful Gradient Influence}},
    author       = {Quoc Minh Nguyen and Trung Le and Jing Wu and Anh Tuan Bui and Mehrtash Harandi},
    year         = 2026,
    booktitle    = {The Fourteenth International Conference on Learning Representations},
    url          = {https://openreview.net/forum?id=qur2ef8MqQ},
}""",
}


register_defense(
    DefenseSpec(
        name="antibody",
        stage="fine-tuning",
        config_class=AntibodyConfig,
        trainer_class=AntibodyTrainer,
        title="Antibody",
        paper=PAPER,
        description="Weights each sample of a batch by softmax((NLL of a refusal - NLL of its answer) / tau).",
        # The official τ=1 and batch size 16 carry over: the weights are a softmax over the micro-batch, so the
        # bench's batch size (not the model scale) sets their effect. Nothing to rescale.
        bench_overrides={},
        # uniform weights: the weighted token mean is SFT's token mean
        neutral_overrides={"temperature": math.inf},
    )
)

__all__ = ["PAPER", "AntibodyConfig", "AntibodyTrainer"]
