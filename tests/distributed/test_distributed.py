"""Multi-process tests on CPU: every defense under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (2 processes, gloo).

One `accelerate launch` per backend trains every defense that supports it, full fine-tuning and LoRA, for a few
steps (`run_defense.py`); one more launch per backend constructs the trainers that refuse it. The tests then check,
from rank 0's `result.json` and parameter files (not from the exit code: a rank may abort at interpreter exit after
finishing, see docs/design/integration.md §6):

- the run used the backend it was launched with, on 2 processes, and made the expected optimizer steps;
- every rank ends with the same parameters (SHA-256 of all parameters, ZeRO-3 shards gathered);
- the update equals a single-process run of the same global batch. Every defense computes its per-micro-batch
  quantities (Vaccine's perturbation norm, Booster's harmful-gradient norm, Antibody's softmax weights, ...) on the
  micro-batch a rank sees, so 2 ranks × batch b × accumulation GA is compared with 1 process × batch b × accumulation
  2·GA, whose micro-batches are the same samples in the same order (accelerate deals batch k of the global order to
  rank k mod 2). 1 process × batch 2b would normalise over twice the samples and is only equal for plain SFT.

The matrix comes from the registry, so a new defense is tested as soon as it is registered.
"""

from __future__ import annotations

import os

import pytest
from launching import (
    RANK_LOCAL,
    assert_matches_single_process,
    launch_driver,
    single_process_reference,
    with_variants,
)


BACKENDS = ("ddp", "zero2", "zero3")
# Script flags each CPU profile needs (docs/design/integration.md §6)
SCRIPT_FLAGS = {"ddp": ["--use_cpu", "true"], "zero2": ["--ddp_backend", "gloo"], "zero3": ["--ddp_backend", "gloo"]}

pytestmark = [pytest.mark.slow]


def _matrix():
    """(defense, backend) pairs that must train, and those that must be refused."""
    from trl_safety.registry import list_defenses

    supported, refused = [("sft", b) for b in BACKENDS], []
    for spec in list_defenses():
        if spec.trainer_class is None:  # a post-hoc callback's refusals are unit-tested with its callback
            supported += [(spec.name, b) for b in BACKENDS if b not in spec.unsupported_backends]
            continue
        for backend in BACKENDS:
            (refused if backend in spec.trainer_class.unsupported_backends else supported).append((spec.name, backend))
    return supported, refused


SUPPORTED, REFUSED = _matrix()
# Known defects, kept in the matrix (strict: the test fails once the defect is fixed, so the marker gets removed)
KNOWN_FAILURES: dict[str, str] = {}
SUPPORTED += [(v, b) for d, b in list(SUPPORTED) for v in with_variants([d])[1:]]
# Defenses as callbacks on plain SFT (`run_defense.py` CASES), on the backends they are tested on
SUPPORTED += [(d, b) for d in ("vaccine-callback", "antibody-weighting", "lisa-callback") for b in ("ddp", "zero2")]


def _param(defense, backend):
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[defense])] if defense in KNOWN_FAILURES else []
    return pytest.param(defense, backend, marks=marks, id=f"{defense}-{backend}")


_LAUNCHES: dict[tuple[str, bool], dict] = {}


def launch(backend: str, defenses: list[str], tmp_root: str, expect_unsupported: bool = False) -> dict:
    """Run the driver on 2 processes; return rank 0's summary. Cached per (backend, kind) when it finished."""
    key = (backend, expect_unsupported)
    if key in _LAUNCHES:
        return _LAUNCHES[key]
    from trl_safety.cli.train import resolve_accelerate_config

    out = os.path.join(tmp_root, f"{backend}-{'refused' if expect_unsupported else 'trained'}")
    flags = [*SCRIPT_FLAGS[backend], *(["--expect_unsupported"] if expect_unsupported else [])]
    summary = launch_driver(resolve_accelerate_config(f"cpu_{backend}"), defenses, out, flags)
    _LAUNCHES[key] = summary
    return summary


def reference(defense: str, tmp_root: str) -> str:
    """Single-process run on the same micro-batches: batch b, accumulation 2·GA (in this process)."""
    return single_process_reference(defense, os.path.join(tmp_root, f"single-{defense}"))


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("distributed"))


def _defenses_for(backend: str, pairs) -> list[str]:
    return [d for d, b in pairs if b == backend]


@pytest.mark.flaky(reruns=2)
@pytest.mark.parametrize("defense,backend", [_param(d, b) for d, b in SUPPORTED])
def test_defense_trains_identically_on_every_rank(defense, backend, tmp_root):
    summary = launch(backend, _defenses_for(backend, SUPPORTED), tmp_root)
    results = [r for r in summary["results"] if r["defense"] == defense]
    assert results, f"{defense} produced no result under {backend}"
    single = reference(defense, tmp_root)
    for result in results:
        mode = result["mode"]
        assert "exception" not in result, f"{defense} ({mode}) failed under {backend}:\n{result['exception']}"
        assert result["backend"] == backend and result["num_processes"] == 2
        assert result["global_step"] > 0
        assert len(result["rank_hashes"]) == 2 and len(set(result["rank_hashes"])) == 1, (
            f"{defense} ({mode}): parameters differ across ranks under {backend}"
        )
        if defense not in RANK_LOCAL:
            assert_matches_single_process(defense, result, summary["output_dir"], single)


@pytest.mark.flaky(reruns=2)
@pytest.mark.parametrize("defense,backend", REFUSED, ids=[f"{d}-{b}" for d, b in REFUSED])
def test_unsupported_backend_is_refused(defense, backend, tmp_root):
    from trl_safety.registry import get_defense

    summary = launch(backend, _defenses_for(backend, REFUSED), tmp_root, expect_unsupported=True)
    (outcome,) = [r for r in summary["unsupported"] if r["defense"] == defense]
    assert outcome["error_type"] == "NotImplementedError", f"{defense} was not refused under {backend}: {outcome}"
    trainer_class = get_defense(defense).trainer_class
    message = outcome["error"]
    assert f"cannot run under {backend}" in message
    assert trainer_class.unsupported_backends[backend] in message
    assert "Supported backends: " + ", ".join(trainer_class.supported_backends()) in message
