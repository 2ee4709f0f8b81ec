"""The contract every defense meets, checked for every registered one (`list_defenses()`) plus a test-only example.

Nothing here names a defense: settings come from the spec (`neutral_overrides`, `paired_data`, the trainer's
`extra_datasets`) and the config's declarations (`tests/test_input_rules.py`'s `small_values`), so a defense that
registers is checked without editing this file. `tests/example_defense.py` shows the smallest defense that passes.
A defense's own test file keeps only its algorithm's numbers. Contract: docs/design/architecture.md §3 and §13.

Trainer defenses: (1) at `neutral_overrides` it is `SFTTrainer` bit for bit, (2) GA 1 at batch 2B = GA 2 at batch B,
(3) gradient checkpointing (non-reentrant) gives the same update, (4) resume is bit-exact, (5) `save_model` writes a
card naming the defense and `defense_config.json`, (6) the generic bad-input rules. Post-hoc defenses: the neutral
settings leave the model unchanged, and the `trl-safety prune` save path writes the card and `defense_config.json`.
"""

from __future__ import annotations

import inspect
import json

import pytest
import test_input_rules as rules
import torch
from datasets import Dataset
from example_defense import EXAMPLE_SPEC
from peft import LoraConfig, get_peft_model
from testing_utils import TINY_LORA, build_model, build_tokenizer, prompt_completion_dataset, tiny_config
from trl import SFTConfig, SFTTrainer

from trl_safety import registry
from trl_safety.core.batches import CyclingBatches
from trl_safety.core.config import defense_field_names, numeric_defense_fields
from trl_safety.registry import list_defenses, register_defense


SPECS = list_defenses()
TRAINER_NAMES = [s.name for s in SPECS if s.trainer_class is not None] + [EXAMPLE_SPEC.name]
POST_HOC_NAMES = [s.name for s in SPECS if s.trainer_class is None]
FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture
def spec(request, monkeypatch):
    """The spec of `request.param`; the example defense is registered for this test only."""
    if request.param == EXAMPLE_SPEC.name:
        monkeypatch.setitem(registry._REGISTRY, EXAMPLE_SPEC.name, EXAMPLE_SPEC)  # removed again after the test
        register_defense(EXAMPLE_SPEC)  # writes the identity onto the example's classes
        assert EXAMPLE_SPEC in list_defenses()
    return registry.get_defense(request.param)


def trainer_cases():
    return pytest.mark.parametrize("spec", TRAINER_NAMES, indirect=True)


# --------------------------------------------------------------------------------------------------------- builders
def datasets_for(spec, same_rows: bool = False):
    """Train and extra datasets. `same_rows`: every train row is one row and every extra dataset one row (or, paired,
    that row's partner), so every micro-batch and every auxiliary batch holds the same samples whatever the split."""
    if not same_rows:
        return rules.datasets_for(spec)
    row = prompt_completion_dataset(1)[0]
    train = Dataset.from_dict({"prompt": [row["prompt"]] * 8, "completion": [row["completion"]] * 8})
    answer = prompt_completion_dataset(1, seed=7)[0]["completion"]
    extra = {}
    for role in spec.trainer_class.extra_datasets:
        if spec.paired_data:
            extra[role] = Dataset.from_dict({"prompt": train["prompt"], "completion": [answer] * 8})
        else:
            extra[role] = prompt_completion_dataset(1, seed=1)
    return train, extra


def make_trainer(spec, output_dir, *, sft=False, peft=False, same_rows=False, checkpointing=False, **values):
    """The defense's trainer (or, `sft=True`, plain `SFTTrainer` on the same train data) on the 2-layer tiny Llama."""
    train, extra = datasets_for(spec, same_rows)
    if checkpointing:
        values.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if sft:
        trainer_class, args, extra = SFTTrainer, tiny_config(output_dir, SFTConfig, **values), {}
    else:
        trainer_class = spec.trainer_class
        args = tiny_config(output_dir, spec.config_class, **{**rules.small_values(spec), **values})
    return trainer_class(
        build_model("llama", hidden=32, layers=2, seed=0),
        args=args,
        train_dataset=train,
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(**TINY_LORA) if peft else None,
        **{f"{role}_dataset": dataset for role, dataset in extra.items()},
        # a reference model of the same architecture for each model role (the base of AsFT's alignment direction)
        **{
            f"{role}_model": build_model("llama", hidden=32, layers=2, seed=1)
            for role in getattr(trainer_class, "extra_models", ())
        },
    )


def parameters(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_states_equal(a, b, path="state"):
    """Defense states (nests of dicts, lists, tensors and JSON scalars) are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_states_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}/{index}")
    else:
        assert a == b, path


# plain SGD, constant rate, no clipping: the update is −lr·gradient, so a factor 2 or a missing term in the gradient
# shows in the weights unchanged in size (Adam would normalise it away, and amplify the noise of near-zero entries)
SGD = dict(optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)


def assert_same_update(start, actual, expected, what):
    """Two runs from the same start took the same update, up to fp32 reduction order (docs/testing.md)."""
    for name in start:
        update, reference = actual[name] - start[name], expected[name] - start[name]
        # gradients of another reduction order (batched vs split, recomputed vs stored activations) differ by
        # ≲ 1e-6·max|g| (docs/testing.md: gradient tolerance c = 1e-5 has ≥ 10× margin); 2 SGD steps carry that into
        # the update, plus the rounding of w − lr·g on weights of size |w| (4 eps·|w|). A missing or doubled term
        # moves the update by ≥ 1e-3 of its size, ≥ 100× above this.
        atol = 1e-5 * float(reference.abs().max()) + 4 * FP32_EPS * float(start[name].abs().max())
        torch.testing.assert_close(update, reference, rtol=1e-5, atol=atol, msg=f"{what}: {name}")


# ------------------------------------------------------------------------------------ (1) strength zero = SFTTrainer
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@trainer_cases()
def test_neutral_settings_equal_sft_trainer_bit_for_bit(tmp_path, spec, peft):
    if spec.neutral_overrides is None:
        pytest.skip(f"{spec.name} declares no neutral setting (DefenseSpec.neutral_overrides is None)")
    common = dict(max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    defense = make_trainer(spec, tmp_path / "defense", peft=peft, **common, **spec.neutral_overrides)
    defense.train()
    sft = make_trainer(spec, tmp_path / "sft", sft=True, peft=peft, **common)
    before = parameters(sft)
    sft.train()
    sft_params = parameters(sft)
    trained = False
    for name, param in defense.model.named_parameters():
        # same kernels on the same inputs: exact (docs/testing.md)
        assert torch.equal(param, sft_params[name]), name
        trained |= not torch.equal(before[name], sft_params[name])
    assert trained, "the runs must train for the comparison to mean anything"
    # the defense's extra passes did not run: no auxiliary batch was drawn
    for name, value in vars(defense).items():
        if isinstance(value, CyclingBatches):
            assert value.state_dict() == {"epoch": 0, "position": 0}, name


# ------------------------------------------------------------------------------------------ (2) gradient accumulation
@trainer_cases()
def test_gradient_accumulation_splits_a_batch_without_changing_the_update(tmp_path, spec):
    """GA 1 at batch 4 == GA 2 at batch 2, at the defense's own (active) settings.

    Every micro-batch and auxiliary batch holds the same samples (`same_rows`), so the split changes nothing but the
    arithmetic, also for defenses whose step depends on the batch's composition (per-batch norms or weights) and
    whose auxiliary draws are per micro-batch: any difference is the GA scaling of a term.
    """
    values = dict(same_rows=True, max_steps=2, **SGD)
    reason = spec.trainer_class.split_dependence
    if reason:  # the algorithm itself depends on the split: check its neutral path
        if spec.neutral_overrides is None:
            pytest.skip(f"{spec.name}: {reason} And it has no neutral setting.")
        values.update(spec.neutral_overrides)
    one = make_trainer(spec, tmp_path / "ga1", per_device_train_batch_size=4, **values)
    start = parameters(one)
    one.train()
    two = make_trainer(spec, tmp_path / "ga2", per_device_train_batch_size=2, gradient_accumulation_steps=2, **values)
    two.train()
    assert_same_update(start, parameters(two), parameters(one), "GA 2 vs GA 1")


# ---------------------------------------------------------------------------------------- (3) gradient checkpointing
@trainer_cases()
def test_gradient_checkpointing_gives_the_same_update(tmp_path, spec):
    plain = make_trainer(spec, tmp_path / "plain", max_steps=2, **SGD)
    start = parameters(plain)
    plain.train()
    checkpointed = make_trainer(spec, tmp_path / "gc", checkpointing=True, max_steps=2, **SGD)
    checkpointed.train()
    assert_same_update(start, parameters(checkpointed), parameters(plain), "checkpointed vs plain")


# -------------------------------------------------------------------------------------------------------- (4) resume
@trainer_cases()
def test_resume_is_bit_exact(tmp_path, spec):
    """4 steps == 2 steps, checkpoint, resume in another folder, 2 steps: weights and defense state equal."""
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
    straight = make_trainer(spec, tmp_path / "a", **common)
    straight.train()
    resumed = make_trainer(spec, tmp_path / "b", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    resumed_params = parameters(resumed)
    for name, param in straight.model.named_parameters():
        assert torch.equal(param, resumed_params[name]), name  # the same computation replayed: exact
    assert_states_equal(straight.defense_state_dict(), resumed.defense_state_dict())


# ----------------------------------------------------------------------------------------------- (5) save and card
@trainer_cases()
def test_save_writes_the_card_and_defense_config(tmp_path, spec):
    trainer = make_trainer(spec, tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert f"{spec.title} (`{spec.name}`)" in card
    if spec.paper.get("id"):
        assert spec.paper["id"] in card
    info = json.loads((tmp_path / "defense_config.json").read_text())
    assert info["defense"] == spec.name and info["stage"] == spec.stage and info["title"] == spec.title
    fields = defense_field_names(spec.config_class)
    assert set(info["hyperparameters"]) == set(fields)
    for name in fields:
        value = getattr(trainer.args, name)
        if isinstance(value, (int, float, str, bool, type(None))):  # others are written as their str()
            assert info["hyperparameters"][name] == value, name


# ------------------------------------------------------------------------------------------ (6) generic bad input
@trainer_cases()
def test_generic_input_rules(tmp_path, spec):
    """The rules `tests/test_input_rules.py` checks for the registered defenses, run here on this spec too."""
    rules.test_another_defense_config_is_refused_naming_both(tmp_path, spec)
    for name, info in numeric_defense_fields(spec.config_class).items():
        rules.test_out_of_range_and_non_finite_values_are_refused(tmp_path, spec, name, info)


# ------------------------------------------------------------------------------------------------ post-hoc defenses
def post_hoc_inputs(tmp_path, spec):
    """A fine-tuned LoRA model (non-zero adapter), its base, an aligned model that differs from the base, data (and
    a safety set for a repair whose entry point takes `alignment_dataset=`, as the bench and the CLI give one)."""
    model = get_peft_model(
        build_model("llama", seed=0), LoraConfig(**TINY_LORA, init_lora_weights=False, task_type="CAUSAL_LM")
    )
    kwargs = dict(
        harmful_dataset=prompt_completion_dataset(8, seed=1),
        processing_class=build_tokenizer(),
        base_model=build_model("llama", seed=0),
        aligned_model=build_model("llama", seed=1),
        output_dir=str(tmp_path / "post"),
    )
    if "alignment_dataset" in inspect.signature(spec.post_hoc).parameters:
        kwargs["alignment_dataset"] = prompt_completion_dataset(8, seed=2)
    return model, kwargs


@pytest.mark.parametrize("spec", POST_HOC_NAMES, indirect=True)
def test_post_hoc_neutral_settings_return_the_model_unchanged(tmp_path, spec):
    assert spec.neutral_overrides is not None, f"{spec.name} declares no neutral setting"
    model, kwargs = post_hoc_inputs(tmp_path, spec)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    repaired = spec.post_hoc(model, spec.config_class(**spec.neutral_overrides), **kwargs)
    after = repaired.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("spec", POST_HOC_NAMES, indirect=True)
def test_post_hoc_repair_output_names_the_defense(tmp_path, spec):
    from trl_safety.cli.prune import PruneArguments, save_repaired

    model, kwargs = post_hoc_inputs(tmp_path, spec)
    config = spec.config_class()
    repaired = spec.post_hoc(model, config, **kwargs)
    args = PruneArguments(
        model_name_or_path="trl-safety-testing/tiny-llama-finetuned", output_dir=str(tmp_path / "out")
    )
    save_repaired(repaired, build_tokenizer(), spec, config, args, is_adapter=True, base_name="tiny-llama")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{spec.title} (`{spec.name}`)" in card
    info = json.loads((tmp_path / "out" / "defense_config.json").read_text())
    assert info["defense"] == spec.name and info["stage"] == spec.stage
    for name in defense_field_names(spec.config_class):
        assert name in info["hyperparameters"], name


# ---------------------------------------------------------------------------------------- the example's own number
@pytest.mark.parametrize("spec", [EXAMPLE_SPEC.name], indirect=True)
def test_example_defense_adds_its_l2_gradient(tmp_path, spec):
    """The example's term is real (so the matrix checks something on it): GA 2 accumulates ∇SFT + 2λθ per step."""
    from testing_utils import run_training_steps

    strength = 0.5
    active = make_trainer(spec, tmp_path / "on", per_device_train_batch_size=2, l2_strength=strength)
    _, with_term = run_training_steps(active, ga=2)
    neutral = make_trainer(spec, tmp_path / "off", per_device_train_batch_size=2, **spec.neutral_overrides)
    _, without = run_training_steps(neutral, ga=2)
    params = [p.detach() for p in active.model.parameters() if p.requires_grad]
    for param, g_on, g_off in zip(params, with_term, without, strict=True):
        expected = g_off + 2 * strength * param  # d/dθ λ‖θ‖², once per step (½ per micro-batch)
        # the same SFT backward plus the term accumulated in another order: fp32 rounding of entries ≤ max|e|
        torch.testing.assert_close(g_on, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        assert (g_on - g_off).abs().max() > 1e-3 * g_off.abs().max()  # the term is not negligible
