"""Multi-process tests of every defense under FSDP2 (2 CPU processes, gloo), through accelerate's own FSDP2 path.

accelerate does not enable FSDP without GPUs (a CPU launch with an FSDP config becomes DDP); the driver therefore
installs `fsdp_cpu_shim.py`, which only lets accelerate's state take its GPU branch (`distributed_type = FSDP`).
Everything else is the production path: transformers' Trainer sees FSDP2, accelerate's `fsdp2_prepare_model` calls
`fully_shard` per decoder layer and on the root, parameters become DTensor shards (checked: `sharded_params`),
gradients are reduce-scattered, and the run's parameters are all-gathered at the end for the comparison.

Same checks as `test_distributed.py`: the run used FSDP2 on 2 processes, every rank ends with the same parameters,
and the update equals a single-process run on the same micro-batches (batch b, accumulation 2·GA). Defenses whose
trainer refuses FSDP (`refused_backends()`) must raise before training. The matrix comes from the registry, so a new
defense is covered (refused until its trainer sets `fsdp_verified = True`) as soon as it is registered.
"""

from __future__ import annotations

import os

import pytest
from launching import (
    HERE,
    RANK_LOCAL,
    assert_matches_single_process,
    launch_driver,
    load_driver,
    single_process_reference,
    with_variants,
)


CONFIG = os.path.join(HERE, "cpu_fsdp2.yaml")
# Post-hoc callbacks: they edit whole weights after training, which FSDP2's DTensor shards do not allow, so they refuse
# at `on_train_begin` (`core.distributed.refuse_sharded_weights`). Once they gather full state dicts, list them as
# supported.
POST_HOC = ("antidote", "safelora", "safe-delta")


def _matrix() -> tuple[list[str], list[str]]:
    from trl_safety.registry import list_defenses

    supported, refused = ["sft"], []
    for spec in list_defenses():
        if spec.trainer_class is None:
            continue
        (refused if "fsdp" in spec.trainer_class.refused_backends() else supported).append(spec.name)
    return with_variants(supported), refused


SUPPORTED, REFUSED = _matrix()


_LAUNCHES: dict[str, dict] = {}


def launch(kind: str, defenses: list[str], tmp_root: str, config: str = CONFIG, *extra: str) -> dict:
    """Run the driver on 2 FSDP2 processes; return rank 0's summary (cached per kind)."""
    if kind in _LAUNCHES:
        return _LAUNCHES[kind]
    env = {"TRL_SAFETY_TEST_FSDP_ON_CPU": "1"}  # the driver installs fsdp_cpu_shim.py
    summary = launch_driver(config, defenses, os.path.join(tmp_root, kind), ["--use_cpu", "true", *extra], env)
    _LAUNCHES[kind] = summary
    return summary


def reference(defense: str, tmp_root: str) -> str:
    """Single-process run on the same micro-batches: batch b, accumulation 2·GA (in this process)."""
    return single_process_reference(defense, os.path.join(tmp_root, f"single-{defense}"))


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fsdp2"))


def _check_sharded(result: dict) -> None:
    assert "exception" not in result, (
        f"{result['defense']} ({result['mode']}) failed under FSDP2:\n{result['exception']}"
    )
    # the shim engaged: accelerate ran FSDP2 (not its CPU fallback to DDP) and the parameters are DTensor shards
    assert result["distributed_type"] == "DistributedType.FSDP" and result["backend"] == "fsdp"
    assert result["num_processes"] == 2 and result["sharded_params"] > 0
    assert result["global_step"] > 0
    assert len(result["rank_hashes"]) == 2 and len(set(result["rank_hashes"])) == 1, (
        f"{result['defense']} ({result['mode']}): parameters differ across ranks under FSDP2"
    )


@pytest.mark.slow
@pytest.mark.flaky(reruns=2)
@pytest.mark.parametrize("defense", SUPPORTED)
def test_defense_trains_identically_under_fsdp2(defense, tmp_root):
    summary = launch("trained", SUPPORTED + list(POST_HOC), tmp_root)
    results = [r for r in summary["results"] if r["defense"] == defense]
    assert {r["mode"] for r in results} == {"full", "lora"}
    single = reference(defense, tmp_root)
    for result in results:
        _check_sharded(result)
        if defense not in RANK_LOCAL:
            assert_matches_single_process(defense, result, summary["output_dir"], single)


@pytest.mark.slow
@pytest.mark.flaky(reruns=2)
@pytest.mark.parametrize("callback", POST_HOC)
def test_post_hoc_callbacks_refuse_fsdp2_shards(callback, tmp_root):
    """Antidote, SafeLoRA and Safe Delta edit whole weights at train end: on DTensor shards they refuse before
    training."""
    summary = launch("trained", SUPPORTED + list(POST_HOC), tmp_root)
    results = [r for r in summary["results"] if r["defense"] == callback]
    assert results
    for result in results:
        assert "exception" in result, f"{callback} ({result['mode']}) now runs under FSDP2: verify it and list it"
        assert "does not support FSDP2's sharded (DTensor) parameters" in result["exception"]


@pytest.mark.slow
@pytest.mark.flaky(reruns=2)
@pytest.mark.parametrize("defense", REFUSED)
def test_unverified_defense_refuses_fsdp2(defense, tmp_root):
    from trl_safety.registry import get_defense

    summary = launch("refused", REFUSED, tmp_root, CONFIG, "--expect_unsupported")
    (outcome,) = [r for r in summary["unsupported"] if r["defense"] == defense]
    assert outcome["error_type"] == "NotImplementedError", f"{defense} was not refused under FSDP2: {outcome}"
    trainer_class = get_defense(defense).trainer_class
    assert "cannot run under fsdp" in outcome["error"]
    assert trainer_class.refused_backends()["fsdp"] in outcome["error"]


def test_fsdp1_is_refused_by_verified_defenses(monkeypatch, tmp_path):
    """FSDP1 cannot start on CPU at all (its plugin asks for an accelerator), so the backend is faked here: a verified
    defense's trainer must refuse FSDP1, since only FSDP2's DTensor parameters were measured."""
    verified = [d for d in SUPPORTED if d != "sft" and "+" not in d]
    if not verified:
        pytest.skip("no defense is verified under FSDP2")
    import trl_safety.core.trainer as core_trainer

    driver = load_driver()
    args = driver.parse_args(["--defense", verified[0], "--output_dir", str(tmp_path), "--use_cpu", "true"])
    monkeypatch.setattr(core_trainer, "backend_name", lambda accelerator: "fsdp")
    monkeypatch.setattr(core_trainer, "fsdp_version", lambda accelerator: 1)
    with pytest.raises(NotImplementedError, match="only FSDP2 is supported"):
        driver.build_trainer(verified[0], "lora", args, str(tmp_path))
    monkeypatch.setattr(core_trainer, "fsdp_version", lambda accelerator: 2)
    driver.build_trainer(verified[0], "lora", args, str(tmp_path))  # FSDP2: constructed
