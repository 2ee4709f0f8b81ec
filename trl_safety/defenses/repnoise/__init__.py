"""RepNoise: representation noising (alignment-stage baseline)."""

from ...registry import DefenseSpec, register_defense
from .repnoise_config import RepNoiseConfig
from .repnoise_trainer import RepNoiseTrainer


_CITATION = """\
@inproceedings{rosati2024representation,
    title     = {{Representation Noising: A Defence Mechanism Against Harmful Finetuning}},
    author    = {Domenic Rosati and Jan Wehner and Kai Williams and Lukasz Bartoszcze and Robie Gonzales and
                 Carsten Maple and Subhabrata Majumdar and Hassan Sajjad and Frank Rudzicz},
    booktitle = {Advances in Neural Information Processing Systems},
    year      = {2024},
    eprint    = {2405.14577},
    archivePrefix = {arXiv}
}"""


register_defense(
    DefenseSpec(
        name="repnoise",
        stage="alignment",
        config_class=RepNoiseConfig,
        trainer_class=RepNoiseTrainer,
        title="RepNoise",
        paper={
            "title": "Representation Noising: A Defence Mechanism Against Harmful Finetuning",
            "id": "2405.14577",
            "citation": _CITATION,
        },
        description="Representation noising: refuse on paired data while pushing harmful representations to noise "
        "and ascending the harmful loss.",
        bench_overrides={"alpha": 0.1, "beta": 0.001},
        paired_data=True,
        # No setting makes RepNoise plain SFT: with alpha=beta=0 it still trains only on the refusal tokens that
        # differ from the paired harmful answer (docs/repnoise.md)
        neutral_overrides=None,
    )
)

__all__ = ["RepNoiseConfig", "RepNoiseTrainer"]
