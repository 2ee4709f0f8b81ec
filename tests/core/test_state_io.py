"""Defense state in checkpoints: safetensors + JSON round trip, old-format reads, and refusal of pickled code."""

import json
import os
import pathlib

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from testing_utils import build_model, build_tokenizer, prompt_completion_dataset, tiny_config

from trl_safety import LisaConfig, LisaTrainer
from trl_safety.core.state_io import (
    LEGACY_STATE_NAME,
    STATE_JSON_NAME,
    STATE_TENSORS_NAME,
    DefenseStateError,
    load_defense_state,
    save_defense_state,
)


def nested_state():
    generator = torch.Generator().manual_seed(3)
    return {
        "phase": "finetune",
        "counter": 7,
        "ema": 0.125,
        "flag": True,
        "missing": None,
        "active": [0, 2, 5],
        "generator": generator.get_state(),
        "anchors": {"alignment": {"w": torch.randn(3, 2)}, "finetune": {"w": torch.randn(3, 2).bfloat16()}},
        "batches": [{"epoch": 1, "position": 4}, None],
    }


def assert_same(a, b):
    assert type(a) is type(b) or (isinstance(a, tuple) and isinstance(b, list))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)  # stored bytes, read back: exact
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_exact_and_uses_no_pickle(tmp_path):
    state = nested_state()
    save_defense_state(str(tmp_path), "lisa", state)
    assert sorted(os.listdir(tmp_path)) == [STATE_JSON_NAME, STATE_TENSORS_NAME]
    defense, loaded = load_defense_state(str(tmp_path))
    assert defense == "lisa"
    assert_same(state, loaded)
    # The tensors are plain safetensors entries, keyed by their path in the state
    assert set(load_file(str(tmp_path / STATE_TENSORS_NAME))) == {
        "generator",
        "anchors/alignment/w",
        "anchors/finetune/w",
    }
    # A restored generator continues the same stream
    restored = torch.Generator()
    restored.set_state(loaded["generator"])
    assert torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=torch.Generator().manual_seed(3)))


def test_unsupported_values_are_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="at anchors is a set"):
        save_defense_state(str(tmp_path), "lisa", {"anchors": {1, 2}})
    with pytest.raises(TypeError, match="must be a string"):
        save_defense_state(str(tmp_path), "lisa", {"anchors": {3: torch.ones(1)}})


def test_old_format_of_this_project_is_read_safely(tmp_path):
    state = nested_state()
    torch.save({"defense": "lisa", "format": 1, "state": state}, tmp_path / LEGACY_STATE_NAME)
    defense, loaded = load_defense_state(str(tmp_path))
    assert defense == "lisa"
    assert_same(state, loaded)


@pytest.mark.parametrize(
    "damage",
    ["truncated-json", "not-a-state", "truncated-tensors", "missing-tensor", "truncated-legacy"],
)
def test_corrupt_state_names_the_file(tmp_path, damage):
    save_defense_state(str(tmp_path), "lisa", nested_state())
    json_path, tensors_path = tmp_path / STATE_JSON_NAME, tmp_path / STATE_TENSORS_NAME
    if damage == "truncated-json":
        json_path.write_text(json_path.read_text()[:20])
        expected = STATE_JSON_NAME
    elif damage == "not-a-state":
        json_path.write_text("[1, 2]")
        expected = STATE_JSON_NAME
    elif damage == "truncated-tensors":
        tensors_path.write_bytes(tensors_path.read_bytes()[:30])
        expected = STATE_TENSORS_NAME
    elif damage == "missing-tensor":
        payload = json.loads(json_path.read_text())
        payload["state"]["extra"] = {"__tensor__": "nowhere"}
        json_path.write_text(json.dumps(payload))
        expected = "nowhere"
    else:
        json_path.unlink()
        tensors_path.unlink()
        torch.save({"defense": "lisa", "format": 1, "state": nested_state()}, tmp_path / LEGACY_STATE_NAME)
        legacy = tmp_path / LEGACY_STATE_NAME
        legacy.write_bytes(legacy.read_bytes()[:200])
        expected = LEGACY_STATE_NAME
    with pytest.raises(DefenseStateError, match=expected):
        load_defense_state(str(tmp_path))


class Payload:
    """Pickled, it would touch `marker` on load: a stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def lisa_trainer(output_dir, **kwargs):
    alignment = Dataset.from_dict(
        {"prompt": prompt_completion_dataset(6, seed=1)["prompt"], "completion": [" sorry cannot help"] * 6}
    )
    args = tiny_config(
        output_dir, LisaConfig, alignment_steps=1, finetune_steps=1, max_steps=2, save_strategy="steps", save_steps=2
    )
    return LisaTrainer(
        build_model(seed=0),
        args,
        train_dataset=prompt_completion_dataset(8),
        alignment_dataset=alignment,
        processing_class=build_tokenizer(),
        **kwargs,
    )


def test_lisa_checkpoint_holds_no_pickle_and_a_planted_payload_is_refused_without_running(tmp_path):
    lisa_trainer(tmp_path / "run").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    # Lisa's two weight anchors are safetensors entries, not a pickle
    anchors = [key for key in load_file(str(checkpoint / STATE_TENSORS_NAME)) if key.startswith("anchors/")]
    assert anchors and not (checkpoint / LEGACY_STATE_NAME).exists()

    # A crafted checkpoint: its defense state replaced by a pickle that would run code when unpickled
    (checkpoint / STATE_JSON_NAME).unlink()
    (checkpoint / STATE_TENSORS_NAME).unlink()
    marker = tmp_path / "payload-ran"
    torch.save(
        {"defense": "lisa", "format": 1, "state": {"phase": Payload(str(marker))}}, checkpoint / LEGACY_STATE_NAME
    )

    with pytest.raises(DefenseStateError, match=f"{LEGACY_STATE_NAME} cannot be read safely"):
        lisa_trainer(tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()

    # The payload is live: an unrestricted unpickler would have run it (what the old loader did)
    torch.load(checkpoint / LEGACY_STATE_NAME, weights_only=False)  # noqa: S614 - the point of this check
    assert marker.exists()
