"""AsFT (fine-tuning stage): penalise the part of each update orthogonal to the alignment direction."""

from ...registry import DefenseSpec, register_defense
from .asft_config import AsFTConfig
from .asft_trainer import AsFTTrainer, dense_penalty, lora_penalty


_CITATION = """\
@inproceedings{yang2026asft,
    title     = {{AsFT: Anchoring Safety During LLM Fine-Tuning Within Narrow Safety Basin}},
    author    = {Shuo Yang and Qihui Zhang and Yuyang Liu and Yue Huang and Xiaojun Jia and Kun-Peng Ning and
                 Jia-Yu Yao and Jigang Wang and Hailiang Dai and Yibing Song and Li Yuan},
    booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
    volume    = {40},
    year      = {2026},
}"""


register_defense(
    DefenseSpec(
        name="asft",
        stage="fine-tuning",
        config_class=AsFTConfig,
        trainer_class=AsFTTrainer,
        title="AsFT",
        paper={
            "title": "AsFT: Anchoring Safety During LLM Fine-Tuning Within Narrow Safety Basin",
            "id": "2506.08473",
            "citation": _CITATION,
        },
        description="Fine-tuning with a penalty on the update orthogonal to the alignment direction (needs a base model).",
        bench_overrides={},
        neutral_overrides={"asft_lambda": 0.0},
    )
)

__all__ = ["AsFTConfig", "AsFTTrainer", "dense_penalty", "lora_penalty"]
