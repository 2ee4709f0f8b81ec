"""SafeMERGE: per-module selection by cos(C·ΔW, ΔW) < τ and the two merges, against closed forms written here."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from testing_utils import TINY_LORA, build_model, build_tokenizer

from trl_safety import SafeLoRAConfig, SafeMERGECallback, SafeMERGEConfig, safelora_project, safemerge
from trl_safety.cli.main import main
from trl_safety.defenses.safemerge import merge_factors, select_and_merge
from trl_safety.registry import get_defense


def factors(seed, r=3, d_in=6, d_out=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, dtype=torch.float64, generator=g), torch.randn(
        d_out, r, dtype=torch.float64, generator=g
    )


def projection(seed, d_out=5, d_in=6):
    v = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return v @ v.T / torch.linalg.matrix_norm(v)


# ------------------------------------------------------------------------------------------- tensor-level oracles
def test_peft_linear_has_cross_terms_and_delta_is_exact():
    (a_f, b_f), (a_s, b_s) = factors(1), factors(2)
    a, b = merge_factors((a_f, b_f, 1.0), (a_s, b_s, 1.0), 0.8, 0.2, "peft_linear")
    cross = 0.8 * b_f @ a_f + 0.2 * b_s @ a_s + 0.4 * (b_f @ a_s + b_s @ a_f)  # √(0.8·0.2) = 0.4
    # fp64, a handful of products: rounding ~1e-15
    torch.testing.assert_close(b @ a, cross, rtol=0, atol=1e-12)
    a, b = merge_factors((a_f, b_f, 1.0), (a_s, b_s, 1.0), 0.8, 0.2, "delta")
    assert a.shape[0] == b.shape[1] == 6  # rank 2r
    torch.testing.assert_close(b @ a, 0.8 * b_f @ a_f + 0.2 * b_s @ a_s, rtol=0, atol=1e-12)
    assert (cross - (0.8 * b_f @ a_f + 0.2 * b_s @ a_s)).norm() > 1.0  # the cross terms are not small


def test_scalings_enter_both_merges():
    (a_f, b_f), (a_s, b_s) = factors(3), factors(4, r=2)
    a, b = merge_factors((a_f, b_f, 2.0), (a_s, b_s, 0.5), 0.7, 0.3, "delta")
    torch.testing.assert_close(b @ a, 0.7 * 2.0 * b_f @ a_f + 0.3 * 0.5 * b_s @ a_s, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="merge='delta'"):  # peft_linear needs equal ranks
        merge_factors((a_f, b_f, 2.0), (a_s, b_s, 0.5), 0.7, 0.3, "peft_linear")


def test_threshold_is_strict_and_unmerged_modules_are_untouched():
    a, b = factors(5)
    identity = torch.eye(5, dtype=torch.float64)  # C·ΔW = ΔW: cos = 1 exactly
    ft, safe = {"m": (a, b, 2.0)}, {"m": (*factors(6), 2.0)}
    records, merged = select_and_merge(ft, safe, {"m": identity}, threshold=1.0, weights=(0.8, 0.2), merge="delta")
    assert records["m"] == {"cosine": 1.0, "merged": False} and merged == {}
    zero = {"m": None}  # alignment left the module unchanged: cosine 0 (the official zero matrix), merged if τ > 0
    records, merged = select_and_merge(ft, safe, zero, threshold=0.35, weights=(0.8, 0.2), merge="delta")
    assert records["m"] == {"cosine": 0.0, "merged": True} and set(merged) == {"m"}


def test_pairing_by_name_survives_a_permuted_order():
    names = [f"layers.{i}.q_proj" for i in range(4)]
    ft = {n: (*factors(10 + i), 1.0) for i, n in enumerate(names)}
    safe = {n: (*factors(20 + i), 1.0) for i, n in enumerate(names)}
    proj = {n: projection(30 + i) for i, n in enumerate(names)}
    kwargs = dict(threshold=0.9, weights=(0.8, 0.2), merge="peft_linear")
    reference_records, reference = select_and_merge(ft, safe, proj, **kwargs)
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    records, permuted = select_and_merge(
        {n: ft[n] for n in shuffled},
        {n: safe[n] for n in reversed(names)},
        {n: proj[n] for n in names[::-1]},
        **kwargs,
    )
    assert records == reference_records and set(permuted) == set(reference)
    for n in names:  # each module's cosine is the one of its own C (an order-paired C would give another value)
        a, b, _ = ft[n]
        expected = F.cosine_similarity((proj[n] @ b @ a).flatten(), (b @ a).flatten(), dim=0).item()
        assert records[n]["cosine"] == round(expected, 5)
    for n in reference:
        assert all(torch.equal(x, y) for x, y in zip(permuted[n], reference[n])), n


# ------------------------------------------------------------------------------------------- on a PEFT model
def aligned_pair():
    """Base and an aligned model whose q/v weights differ by a low-rank update (so C is a real projection)."""
    base, aligned = build_model("llama", seed=0), build_model("llama", seed=0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, module in aligned.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                out_f, in_f = module.weight.shape
                module.weight.add_(
                    torch.randn(out_f, 2, generator=generator) @ torch.randn(2, in_f, generator=generator)
                )
    return base, aligned


def finetuned(seed=0, **lora):
    torch.manual_seed(seed)
    config = LoraConfig(**{**TINY_LORA, **lora}, init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(build_model("llama", seed=0), config)


def save_safety_adapter(tmp_path, seed=1, **lora):
    folder = str(tmp_path / "safety")
    finetuned(seed, **lora).save_pretrained(folder)
    return folder


def lora_state(model, adapter="default"):
    """name -> (A, B, s) of every LoRA module of `adapter`, copied."""
    state = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            state[name] = (a.detach().clone().double(), b.detach().clone().double(), float(module.scaling[adapter]))
    return state


def hand_cosine(base, aligned, name, a, b):
    v = (dict(aligned.named_modules())[name].weight - dict(base.named_modules())[name].weight).double()
    c = v @ v.T / torch.linalg.matrix_norm(v)
    return round(F.cosine_similarity((c @ b @ a).flatten(), (b @ a).flatten(), dim=0).item(), 5)


@pytest.mark.parametrize("merge", ["peft_linear", "delta"])
def test_model_merge_matches_the_closed_form(tmp_path, merge):
    base, aligned = aligned_pair()
    model = finetuned(0)
    safety_folder = save_safety_adapter(tmp_path, seed=1, lora_alpha=4)  # s_safe = 1 ≠ s_ft = 2
    safety = lora_state(PeftModel.from_pretrained(build_model("llama", seed=0), safety_folder))
    before = lora_state(model)
    cosines = {n: hand_cosine(base, aligned, n, a, b) for n, (a, b, _) in before.items()}
    threshold = sorted(cosines.values())[len(cosines) // 2]  # about half the modules, and one exactly at τ
    config = SafeMERGEConfig(safety_adapter=safety_folder, threshold=threshold, merge=merge)
    safemerge(model, config, base_model=base, aligned_model=aligned, output_dir=str(tmp_path / "out"))
    stats = json.loads((tmp_path / "out" / "safemerge_stats.json").read_text())
    assert "safemerge_safety" not in model.peft_config  # the loaded safety adapter is removed again
    after = lora_state(model)
    merged = {n for n, c in cosines.items() if c < threshold}
    assert 0 < len(merged) < len(cosines)
    for name, (a_f, b_f, s_f) in before.items():
        record = stats["modules"][name]
        assert record["cosine"] == cosines[name] and record["merged"] == (name in merged), name
        a, b, s = after[name]
        if name not in merged:  # cos ≥ τ (the module at cos == τ included): untouched, bit for bit
            assert torch.equal(a, a_f) and torch.equal(b, b_f) and s == s_f, name
            continue
        a_s, b_s, s_s = safety[name]
        expected = 0.8 * s_f * b_f @ a_f + 0.2 * s_s * b_s @ a_s
        if merge == "peft_linear":
            expected = expected + (0.8 * 0.2 * s_f * s_s) ** 0.5 * (b_f @ a_s + b_s @ a_f)
        else:
            assert a.shape[0] == 2 * a_f.shape[0]
        # fp32 factors (stored after dividing by √s): rounding of a rank-8 product of O(1) entries
        torch.testing.assert_close(s * b @ a, expected, rtol=1e-5, atol=1e-5)
    # saved and reloaded through PEFT (rank_pattern / alpha_pattern for the rank-2r modules): the same ΔW
    model.save_pretrained(str(tmp_path / "merged"))
    reloaded = lora_state(PeftModel.from_pretrained(build_model("llama", seed=0), str(tmp_path / "merged")))
    for name, (a, b, s) in after.items():
        torch.testing.assert_close(
            reloaded[name][2] * reloaded[name][1] @ reloaded[name][0], s * b @ a, rtol=0, atol=0
        )


def test_cosines_equal_safeloras(tmp_path):
    base, aligned = aligned_pair()
    model = finetuned(0)
    safemerge(model, SafeMERGEConfig(threshold=-1.0), base_model=base, aligned_model=aligned, output_dir=str(tmp_path))
    ours = json.loads((tmp_path / "safemerge_stats.json").read_text())["modules"]
    safelora_project(
        finetuned(0),
        SafeLoRAConfig(num_proj_layers=0),
        base_model=base,
        aligned_model=aligned,
        output_dir=str(tmp_path),
    )
    theirs = json.loads((tmp_path / "safelora_stats.json").read_text())["modules"]
    assert set(ours) == {k.removesuffix(".default") for k in theirs}
    for name, record in ours.items():
        assert record["cosine"] == round(theirs[f"{name}.default"]["cosine"], 5), name
        assert record["merged"] is False


def test_pairing_by_name_with_layers_to_transform(tmp_path):
    """Only layer 1 adapted: an order-paired projection list would give it layer 0's C (the official code's bug)."""
    base, aligned = aligned_pair()
    model = finetuned(0, layers_to_transform=[1])
    before = lora_state(model)
    assert all(".layers.1." in n for n in before)
    safemerge(model, SafeMERGEConfig(threshold=-1.0), base_model=base, aligned_model=aligned, output_dir=str(tmp_path))
    stats = json.loads((tmp_path / "safemerge_stats.json").read_text())["modules"]
    for name, (a, b, _) in before.items():
        assert stats[name]["cosine"] == hand_cosine(base, aligned, name, a, b)
        assert stats[name]["cosine"] != hand_cosine(base, aligned, name.replace(".layers.1.", ".layers.0."), a, b)


def test_without_a_safety_adapter_merged_modules_keep_w_ft_times_their_update(tmp_path):
    base, aligned = aligned_pair()
    model = finetuned(0)
    before = lora_state(model)
    safemerge(model, SafeMERGEConfig(threshold=1.0, merge="delta"), base_model=base, aligned_model=aligned)
    after = lora_state(model)
    for name, (a_f, b_f, s_f) in before.items():
        a, b, s = after[name]
        assert a.shape == a_f.shape  # no rank change: the partner is zero
        torch.testing.assert_close(s * b @ a, 0.8 * s_f * b_f @ a_f, rtol=1e-5, atol=1e-6)  # fp32 rounding


@pytest.mark.parametrize("overrides", [{"threshold": -1.0}, {"finetuned_weight": 1.0, "safety_weight": 0.0}])
def test_neutral_settings_leave_the_adapter_unchanged(tmp_path, overrides):
    base, aligned = aligned_pair()
    model = finetuned(0)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    config = SafeMERGEConfig(safety_adapter=save_safety_adapter(tmp_path), **{"threshold": 1.0, **overrides})
    safemerge(model, config, base_model=base, aligned_model=aligned)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[n], t) for n, t in before.items())


def test_a_loaded_adapter_can_be_the_safety_adapter(tmp_path):
    base, aligned = aligned_pair()
    folder = save_safety_adapter(tmp_path)
    by_folder = finetuned(0)
    safemerge(by_folder, SafeMERGEConfig(safety_adapter=folder, threshold=1.0), base_model=base, aligned_model=aligned)
    by_name = finetuned(0)
    by_name.load_adapter(folder, adapter_name="safe")
    safemerge(by_name, SafeMERGEConfig(safety_adapter="safe", threshold=1.0), base_model=base, aligned_model=aligned)
    assert "safe" in by_name.peft_config  # a user's adapter is left loaded
    for name, (a, b, _) in lora_state(by_folder).items():
        assert torch.equal(a, lora_state(by_name)[name][0]) and torch.equal(b, lora_state(by_name)[name][1])


def test_bad_input_fails_early(tmp_path):
    base, aligned = aligned_pair()
    with pytest.raises(ValueError, match="`merge`"):
        SafeMERGEConfig(merge="ties")
    with pytest.raises(ValueError, match="threshold"):
        SafeMERGEConfig(threshold=1.5)
    with pytest.raises(ValueError, match="safety_adapter"):
        safemerge(finetuned(0), SafeMERGEConfig(safety_adapter="nowhere"), base_model=base, aligned_model=aligned)
    with pytest.raises(ValueError, match="aligned_model"):
        safemerge(finetuned(0), SafeMERGEConfig(), base_model=base)
    with pytest.raises(ValueError, match="no active LoRA adapter"):
        safemerge(build_model("llama"), SafeMERGEConfig(), base_model=base, aligned_model=aligned)
    folder = save_safety_adapter(tmp_path, r=2, lora_alpha=4)
    model = finetuned(0)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="merge='delta'"):  # rank 2 vs 4, refused before anything is merged
        safemerge(model, SafeMERGEConfig(safety_adapter=folder, threshold=1.0), base_model=base, aligned_model=aligned)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


def test_callback_merges_at_train_end(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    base, aligned = aligned_pair()
    model, reference = finetuned(0), finetuned(0)
    config = SafeMERGEConfig(safety_adapter=save_safety_adapter(tmp_path), threshold=1.0)
    callback = SafeMERGECallback(config, base_model=base, aligned_model=aligned)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[])
    callback.on_train_end(args, TrainerState(), TrainerControl(), model=model)
    safemerge(reference, config, base_model=base, aligned_model=aligned)
    for name, (a, b, _) in lora_state(reference).items():
        assert torch.equal(lora_state(model)[name][0], a) and torch.equal(lora_state(model)[name][1], b)
    assert (tmp_path / "run" / "safemerge_stats.json").is_file()
    assert get_defense("safemerge").post_hoc is not None


def test_callback_refuses_zero3_before_training(tmp_path):
    """Under ZeRO-3 (parameters carry DeepSpeed's `ds_id`) the merged factors could not change rank: refused at
    `on_train_begin`, not after the run."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = finetuned(0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[])
    callback = SafeMERGECallback(SafeMERGEConfig(threshold=1.0))
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)  # no ZeRO-3: accepted
    next(model.parameters()).ds_id = 0
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    assert get_defense("safemerge").unsupported_backends == ("zero3",)


def test_prune_cli(tmp_path):
    base, aligned = aligned_pair()
    for model, name in ((base, "base"), (aligned, "aligned")):
        model.save_pretrained(str(tmp_path / name))
        build_tokenizer().save_pretrained(str(tmp_path / name))
    model = get_peft_model(
        AutoBase.load(str(tmp_path / "aligned")),
        LoraConfig(**TINY_LORA, init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    model.save_pretrained(str(tmp_path / "sft"))
    safety = save_safety_adapter(tmp_path)
    out = tmp_path / "out"
    argv = ["prune", "--defense", "safemerge", "--model_name_or_path", str(tmp_path / "sft"), "--base_model"]
    argv += [str(tmp_path / "base"), "--aligned_model", str(tmp_path / "aligned"), "--safety_adapter", safety]
    argv += ["--threshold", "1.0", "--merge", "delta", "--output_dir", str(out), "--device", "cpu"]
    assert main(argv) == 0
    reference = PeftModel.from_pretrained(AutoBase.load(str(tmp_path / "aligned")), str(tmp_path / "sft"))
    safemerge(
        reference,
        SafeMERGEConfig(safety_adapter=safety, threshold=1.0, merge="delta"),
        base_model=str(tmp_path / "base"),
        aligned_model=str(tmp_path / "aligned"),
    )
    saved = lora_state(PeftModel.from_pretrained(AutoBase.load(str(tmp_path / "aligned")), str(out)))
    for name, (a, b, s) in lora_state(reference).items():
        torch.testing.assert_close(saved[name][2] * saved[name][1] @ saved[name][0], s * b @ a, rtol=0, atol=0)
    info = json.loads((out / "defense_config.json").read_text())
    assert info["defense"] == "safemerge" and info["hyperparameters"]["merge"] == "delta"
    assert json.loads((out / "safemerge_stats.json").read_text())["num_merged"] > 0


class AutoBase:
    @staticmethod
    def load(path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path)


def test_prune_cli_refuses_a_missing_safety_adapter_in_one_line(tmp_path, capsys):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text("{}")
    argv = ["prune", "--defense", "safemerge", "--model_name_or_path", str(tmp_path / "sft"), "--safety_adapter"]
    argv += [str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--safety_adapter" in error and "adapter_config.json" in error
