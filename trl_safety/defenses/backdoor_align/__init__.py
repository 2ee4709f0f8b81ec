"""BackdoorAlign: safety examples with a secret trigger mixed into the user's fine-tuning (fine-tuning stage)."""

from ...registry import DefenseSpec, register_defense
from .backdoor_align_config import BackdoorAlignConfig
from .backdoor_align_trainer import BackdoorAlignTrainer
from .trigger import generate_trigger, read_trigger, triggered_prompt_format


_CITATION = """\
@inproceedings{wang2024backdooralign,
    title     = {{BackdoorAlign: Mitigating Fine-tuning based Jailbreak Attack with Backdoor Enhanced Safety Alignment}},
    author    = {Jiongxiao Wang and Jiazhao Li and Yiquan Li and Xiangyu Qi and Junjie Hu and Yixuan Li and
                 Patrick McDaniel and Muhao Chen and Bo Li and Chaowei Xiao},
    year      = 2024,
    booktitle = {Advances in Neural Information Processing Systems 37 (NeurIPS 2024)},
}"""


register_defense(
    DefenseSpec(
        name="backdoor-align",
        stage="fine-tuning",
        config_class=BackdoorAlignConfig,
        trainer_class=BackdoorAlignTrainer,
        title="BackdoorAlign (secret-prompt safety examples)",
        paper={
            "title": "BackdoorAlign: Mitigating Fine-tuning based Jailbreak Attack with Backdoor Enhanced Safety "
            "Alignment",
            "id": "2402.14968",
            "citation": _CITATION,
        },
        description="Mixes safety examples prefixed with a secret trigger into fine-tuning; the provider prepends "
        "the trigger at inference.",
        bench_overrides={},
        neutral_overrides={"safety_weight": 0.0},
    )
)

__all__ = [
    "BackdoorAlignConfig",
    "BackdoorAlignTrainer",
    "generate_trigger",
    "read_trigger",
    "triggered_prompt_format",
]
