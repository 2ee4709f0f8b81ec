import dataclasses
from dataclasses import dataclass, field

import pytest
from trl import SFTConfig

from trl_safety.core import HarmfulDataArguments, check_range, defense_field_names, upgrade_config


@dataclass
class ToyDefenseConfig(HarmfulDataArguments, SFTConfig):
    toy_rho: float = field(default=2.0, metadata={"help": "strength"})

    def __post_init__(self):
        check_range(self, "toy_rho", 0.0, None)
        super().__post_init__()


def test_upgrade_keeps_every_field_including_tokens(tmp_path):
    args = SFTConfig(
        output_dir=str(tmp_path),
        bf16=False,
        learning_rate=3e-4,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        gradient_checkpointing_kwargs={"use_reentrant": True},
        max_length=77,
        per_device_train_batch_size=3,
        report_to="none",
    )
    upgraded = upgrade_config(args, ToyDefenseConfig)
    assert isinstance(upgraded, ToyDefenseConfig)
    assert upgraded.toy_rho == 2.0
    for f in dataclasses.fields(SFTConfig):
        if f.init:
            assert getattr(upgraded, f.name) == getattr(args, f.name), f.name
    # `to_dict()` would have masked these
    assert upgraded.eos_token == "<|im_end|>"
    assert upgraded.pad_token == "<pad>"


def test_upgrade_is_identity_for_the_target_class(tmp_path):
    config = ToyDefenseConfig(output_dir=str(tmp_path), bf16=False, toy_rho=1.0)
    assert upgrade_config(config, ToyDefenseConfig) is config


def test_defense_fields_and_range_errors(tmp_path):
    assert defense_field_names(ToyDefenseConfig) == [
        "harmful_dataset_name",
        "harmful_dataset_config",
        "harmful_dataset_split",
        "harmful_num_samples",
        "toy_rho",
    ]
    with pytest.raises(ValueError, match=r"`toy_rho` must be a finite number in \[0.0, inf\), got -1.0"):
        ToyDefenseConfig(output_dir=str(tmp_path), bf16=False, toy_rho=-1.0)


def test_cli_parser_accepts_defense_fields(tmp_path):
    from trl import TrlParser

    config_file = tmp_path / "cfg.yaml"
    config_file.write_text("toy_rho: 5.0\nlearning_rate: 0.001\n")
    parser = TrlParser((ToyDefenseConfig,))
    (config,) = parser.parse_args_and_config(
        ["--config", str(config_file), "--output_dir", str(tmp_path), "--bf16", "false", "--learning_rate", "0.01"]
    )
    assert config.toy_rho == 5.0
    assert config.learning_rate == 0.01  # CLI wins over YAML
