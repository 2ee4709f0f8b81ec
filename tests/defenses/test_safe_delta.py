"""Safe Delta: the selection and OBS compensation against hand computations written here (fp64 where it helps)."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from testing_utils import TINY_LORA, build_model, build_tokenizer, prompt_completion_dataset
from torch import nn

from trl_safety import SafeDeltaCallback, SafeDeltaConfig, safe_delta, safe_delta_matrix
from trl_safety.cli.main import main
from trl_safety.defenses.safe_delta.safe_delta_select import input_hessians, select_block
from trl_safety.registry import get_defense


def rand(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def spd(n, seed):
    a = rand(n, 2 * n, seed=seed)
    return a @ a.T / n


# ------------------------------------------------------------------------------------------- (a) diagonal H
def test_diagonal_hessian_selects_by_column_sensitivity_without_compensation():
    rows, cols = 3, 4
    h = [1.0, 4.0, 1.0, 9.0]  # columns 0 and 2 tie: entries ordered row-major across them (stable sort, bug 5)
    w_a, w_f = rand(rows, cols, seed=0), rand(rows, cols, seed=1)
    percdamp, ratio, ref = 0.01, 0.25, 2
    damp = percdamp * sum(h) / cols
    r = [hj + damp for hj in h]
    # entries by (r_j, row-major index): the two tied columns interleave row by row
    order = sorted((r[j], i * cols + j, i, j) for i in range(rows) for j in range(cols))
    eligible = order[: rows * cols - int(ratio * rows * cols)]  # the 3 entries of column 3 are excluded
    mean_r = sum(r) / cols
    factor = (cols / ref) * (rows / ref)
    costs = [(w_f[i, j] - w_a[i, j]).item() ** 2 * r[j] for _, _, i, j in eligible]
    k = 4  # put the boundary after the 4th entry, inside the tied pair: budget between prefix sums 4 and 5
    budget = sum(costs[:k]) + 0.5 * costs[k]
    scale = budget / (mean_r * factor)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for _, _, i, j in eligible[:k]:
        mask[i, j] = True
    result, stats = safe_delta_matrix(
        w_a,
        w_f,
        torch.diag(torch.tensor(h, dtype=torch.float64)),
        scale=scale,
        exclude_ratio=ratio,
        percdamp=percdamp,
        block_size=cols,
        budget_ref_dim=ref,
    )
    # diagonal H: U is diagonal, so no error reaches another column; the only arithmetic is copying entries
    assert torch.equal(result, torch.where(mask, w_f, w_a))
    assert stats["selected"] == k and mask[:, 0].sum() == 2 and mask[:, 2].sum() == 2  # boundary inside the tie


# ------------------------------------------------------------------------------------ (b) two-column OBS formula
def test_unselected_column_gets_the_obs_compensation():
    h = torch.tensor([[2.0, 1.0], [1.0, 5.0]], dtype=torch.float64)
    rows, percdamp = 3, 0.01
    w_a, w_f = rand(rows, 2, seed=2), rand(rows, 2, seed=3)
    damped = h + percdamp * h.diagonal().mean() * torch.eye(2, dtype=torch.float64)
    h_inv = torch.linalg.inv(damped)
    # r_j = 1/U_jj²: the first column's is 1/[H⁻¹]_00, the last one's H_11 (Schur complement), no Cholesky needed
    r0, r1 = 1 / h_inv[0, 0].item(), damped[1, 1].item()
    assert r0 < r1  # column 0 comes first
    c0 = ((w_f[:, 0] - w_a[:, 0]) ** 2 * r0).sum().item()
    c1_first = (w_f[0, 1] - w_a[0, 1]).item() ** 2 * r1
    factor = (2 / 1) * (rows / 1)
    scale = (c0 + 0.5 * c1_first) / ((r0 + r1) / 2 * factor)  # column 0 fits, the first entry of column 1 does not
    result, stats = safe_delta_matrix(
        w_a, w_f, h, scale=scale, exclude_ratio=0.0, percdamp=percdamp, block_size=2, budget_ref_dim=1
    )
    expected_1 = w_a[:, 1] - (w_a[:, 0] - w_f[:, 0]) * h_inv[0, 1] / h_inv[0, 0]
    assert stats["selected"] == rows
    assert torch.equal(result[:, 0], w_f[:, 0])
    # Cholesky path vs the closed form from inv(H): fp64 rounding of a 2×2 problem, ~1e-15 relative
    torch.testing.assert_close(result[:, 1], expected_1, rtol=1e-12, atol=1e-12)
    assert (expected_1 - w_a[:, 1]).abs().max() > 0.1  # the compensation is not negligible


# ------------------------------------------------------------------------------------ (c) the two extremes
def test_unlimited_budget_gives_the_finetuned_and_zero_budget_the_aligned_weights():
    w_a, w_f, h = rand(16, 12, seed=4), rand(16, 12, seed=5), spd(12, 6)
    kwargs = dict(percdamp=0.01, block_size=5, sub_block=2, budget_ref_dim=8)
    full, stats = safe_delta_matrix(w_a, w_f, h, scale=1e30, exclude_ratio=0.0, **kwargs)
    assert torch.equal(full, w_f) and stats["selected"] == 16 * 12  # every entry is overwritten by W_f
    none, stats = safe_delta_matrix(w_a, w_f, h, scale=0.0, **kwargs)
    assert torch.equal(none, w_a) and stats["selected"] == 0  # no δ is zero here


def test_an_exclusion_count_of_zero_excludes_nothing():
    """Official bug 7: `sorted[0:-int(0.15·n)]` is empty for n < 7, so nothing could be selected in a small block."""
    cost, r = torch.ones(2, 3), torch.tensor([1.0, 2.0, 3.0])
    assert int(0.15 * 6) == 0
    assert select_block(cost, r, budget=100.0, exclude_ratio=0.15).all()
    mask = select_block(cost, r, budget=100.0, exclude_ratio=0.34)  # int(2.04) = 2: column 2 (largest r) excluded
    assert mask[:, :2].all() and not mask[:, 2].any()


# ------------------------------------------------------------------------------- (d) a numpy re-implementation
def numpy_safe_delta(w_a, w_f, h, scale, exclude_ratio, percdamp, block_size, ref):
    """Steps 2-4 with explicit loops: every column propagates its error to all later columns at once."""
    w, w_f, h = w_a.copy(), w_f.copy(), h.copy()
    rows, cols = w.shape
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1.0
    h += percdamp * np.mean(np.diag(h)) * np.eye(cols)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = UᵀU
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        entries = []
        for i in range(rows):
            for j in range(start, end):
                rj = 1.0 / u[j, j] ** 2
                entries.append((rj, i * (end - start) + (j - start), i, j))
        entries.sort()
        r_mean = np.mean([1.0 / u[j, j] ** 2 for j in range(start, end)])
        budget = r_mean * scale * (block_size / ref) * (rows / ref)
        n_excluded = int(exclude_ratio * len(entries))
        chosen, total = set(), 0.0
        for rj, _, i, j in entries[: len(entries) - n_excluded]:
            total += (w_f[i, j] - w[i, j]) ** 2 * rj
            if total > budget:
                break
            chosen.add((i, j))
        for j in range(start, end):
            for i in range(rows):
                if (i, j) in chosen:
                    err = (w[i, j] - w_f[i, j]) / u[j, j]
                    w[i, j] = w_f[i, j]
                    for later in range(j + 1, cols):
                        w[i, later] -= err * u[j, later]
    return w


@pytest.mark.parametrize(("shape", "block_size", "sub_block", "ref"), [((8, 8), 8, 4, 8), ((16, 12), 5, 2, 6)])
@pytest.mark.parametrize("scale", [2.0, 10.0, 50.0])
def test_matches_a_numpy_reimplementation(shape, block_size, sub_block, ref, scale):
    rows, cols = shape
    w_a, w_f, h = rand(rows, cols, seed=7), rand(rows, cols, seed=8), spd(cols, 9)
    h[2, :] = h[:, 2] = 0  # a dead input feature
    result, stats = safe_delta_matrix(
        w_a,
        w_f,
        h,
        scale=scale,
        exclude_ratio=0.15,
        percdamp=0.01,
        block_size=block_size,
        sub_block=sub_block,
        budget_ref_dim=ref,
    )
    expected = numpy_safe_delta(w_a.numpy(), w_f.numpy(), h.numpy(), scale, 0.15, 0.01, block_size, ref)
    # fp64, other op order (lazy batches vs per-entry loops): ~cols·eps·max|w| ≈ 1e-14; 1e-10 still fails on any
    # wrong selection or missing compensation (effects ≥ 1e-2)
    torch.testing.assert_close(result, torch.from_numpy(expected), rtol=0, atol=1e-10)
    assert 0 < stats["selected"] < rows * cols  # a real mix of selected and compensated entries
    assert (result - torch.where(result == w_f, w_f, w_a)).abs().max() > 1e-2  # compensation happened


# --------------------------------------------------------------------------------------- (e) H from hooks
def test_hessian_from_hooks_equals_the_explicit_stack_of_inputs():
    model, tokenizer = build_model("llama", seed=0), build_tokenizer()
    sequences = [tokenizer("alpha beta gamma delta")["input_ids"], tokenizer("beta")["input_ids"]]
    assert len(sequences[0]) != len(sequences[1])  # the batch is padded
    layer = model.model.layers[1]
    modules = [layer.self_attn.q_proj, layer.mlp.down_proj]
    ids = torch.full((2, max(map(len, sequences))), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    hessians, n = input_hessians(model, modules, [{"input_ids": ids, "attention_mask": mask}], stop_after=layer)
    assert n == 2
    for index, module in enumerate(modules):
        captured: list[torch.Tensor] = []

        def capture(_module, inputs, _output, captured=captured):
            captured.append(inputs[0][0])

        handle = module.register_forward_hook(capture)
        with torch.no_grad():
            for seq in sequences:  # one unpadded sequence at a time
                model(input_ids=torch.tensor([seq]))
        handle.remove()
        x = torch.cat(captured).double()
        expected = 2 / 2 * x.T @ x
        # padded batch vs single sequences, fp32 activations of a 32/64-wide layer: ~1e-6 relative to the largest entry
        torch.testing.assert_close(hessians[index].double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


# --------------------------------------------------------------------------------------------- whole models
def finetuned_pair(seed=1):
    aligned = build_model("llama", seed=0)
    finetuned = build_model("llama", seed=0)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return aligned, finetuned


def safety_data():
    return prompt_completion_dataset(4, seed=3)


def test_whole_model_extremes_and_the_non_linear_choice():
    tokenizer = build_tokenizer()
    aligned, finetuned = finetuned_pair()
    ref_a, ref_f = aligned.state_dict(), {k: v.clone() for k, v in finetuned.state_dict().items()}
    linears = {f"{n}.weight" for n, m in finetuned.model.layers.named_modules() if isinstance(m, nn.Linear)}
    linears = {f"model.layers.{n}" for n in linears}
    assert len(linears) == 14  # q, k, v, o, gate, up, down × 2 layers

    config = SafeDeltaConfig(scale=1e30, exclude_ratio=0.0, non_linear_params="finetuned")
    out = safe_delta(
        finetuned,
        safety_data(),
        config,
        aligned_model=aligned,
        processing_class=tokenizer,
    )
    assert all(torch.equal(v, ref_f[k]) for k, v in out.state_dict().items())  # computed path, every delta kept

    finetuned.load_state_dict(ref_f)
    out = safe_delta(
        finetuned, safety_data(), SafeDeltaConfig(scale=0.0), aligned_model=aligned, processing_class=tokenizer
    )
    assert all(torch.equal(v, ref_a[k]) for k, v in out.state_dict().items())  # nothing kept, all aligned

    finetuned.load_state_dict(ref_f)
    out = safe_delta(
        finetuned,
        safety_data(),
        SafeDeltaConfig(scale=0.0, non_linear_params="finetuned"),
        aligned_model=aligned,
        processing_class=tokenizer,
    )
    for name, value in out.state_dict().items():
        assert torch.equal(value, ref_a[name] if name in linears else ref_f[name]), name


def test_default_repair_keeps_part_of_the_delta_and_writes_stats(tmp_path):
    tokenizer = build_tokenizer()
    aligned, finetuned = finetuned_pair()
    ref_f = {k: v.clone() for k, v in finetuned.state_dict().items()}
    # the toy layers are 32-64 wide: budget_ref_dim=32 gives them the budget a 4096-wide layer gets at the default
    config = SafeDeltaConfig(scale=0.5, budget_ref_dim=32)
    safe_delta(
        finetuned, safety_data(), config, aligned_model=aligned, processing_class=tokenizer, output_dir=str(tmp_path)
    )
    stats = json.loads((tmp_path / "safe_delta_stats.json").read_text())
    assert stats["calibration_samples"] == 4 and len(stats["modules"]) == 14
    assert 0 < stats["selected_fraction"] < 1
    for name, record in stats["modules"].items():
        assert record["cost_used"] <= record["budget"] * (1 + 1e-6), name
    weight = finetuned.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(weight, ref_f["model.layers.0.self_attn.q_proj.weight"])


def test_lora_input_is_merged_and_equals_the_dense_path():
    tokenizer = build_tokenizer()
    torch.manual_seed(4)
    peft_model = get_peft_model(build_model("llama", seed=0), LoraConfig(**TINY_LORA, init_lora_weights=False))
    merged = get_peft_model(build_model("llama", seed=0), LoraConfig(**TINY_LORA, init_lora_weights=False))
    merged.load_state_dict(peft_model.state_dict())
    merged = merged.merge_and_unload()
    config = SafeDeltaConfig(scale=0.5, budget_ref_dim=32)
    # no aligned_model: the adapter's base weights are W_a, the calibration runs with the adapter disabled
    out = safe_delta(peft_model, safety_data(), config, processing_class=tokenizer)
    assert not any("lora" in name for name in out.state_dict())  # a dense model
    dense = safe_delta(
        merged, safety_data(), config, aligned_model=build_model("llama", seed=0), processing_class=tokenizer
    )
    for name, value in out.state_dict().items():
        # W_f = base + BA from PEFT's delta vs PEFT's merge: the same fp32 add, ≤ 1 ulp apart, amplified by
        # the compensation (entries ~0.1, ~40 column updates) → 1e-5
        torch.testing.assert_close(value, dense.state_dict()[name], rtol=1e-5, atol=1e-5, msg=name)


def test_bad_input_fails_early_naming_the_fix():
    aligned, finetuned = finetuned_pair()
    with pytest.raises(ValueError, match="aligned_model"):
        safe_delta(finetuned, safety_data(), SafeDeltaConfig(), processing_class=build_tokenizer())
    with pytest.raises(ValueError, match="alignment_dataset_name"):
        safe_delta(finetuned, None, SafeDeltaConfig(), aligned_model=aligned)
    with pytest.raises(ValueError, match="target_modules"):
        safe_delta(
            finetuned,
            safety_data(),
            SafeDeltaConfig(target_modules=["lm_head"]),
            aligned_model=aligned,
            processing_class=build_tokenizer(),
        )
    with pytest.raises(ValueError, match="non_linear_params"):
        SafeDeltaConfig(non_linear_params="all")
    with pytest.raises(ValueError, match="exclude_ratio"):
        SafeDeltaConfig(exclude_ratio=1.0)


def test_one_layer_can_be_targeted():
    """Official bug 3 (`st_layer` ≠ 0 broke the layer replay): any subset of layers works with hooks."""
    aligned, finetuned = finetuned_pair()
    ref_f = {k: v.clone() for k, v in finetuned.state_dict().items()}
    config = SafeDeltaConfig(scale=0.0, target_modules=r"model\.layers\.1\..*_proj", non_linear_params="finetuned")
    safe_delta(finetuned, safety_data(), config, aligned_model=aligned, processing_class=build_tokenizer())
    for name, value in finetuned.state_dict().items():
        expected = aligned.state_dict()[name] if name.startswith("model.layers.1.") and "proj" in name else ref_f[name]
        assert torch.equal(value, expected), name


# --------------------------------------------------------------------------------------- callback, registry, CLI
def test_callback_repairs_a_full_fine_tuning_run(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = build_tokenizer()
    start = build_model("llama", seed=0)
    config = SafeDeltaConfig(scale=0.5, budget_ref_dim=32)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        learning_rate=1e-2,
        use_cpu=True,
        save_strategy="no",
    )
    trainer = SFTTrainer(
        build_model("llama", seed=0),
        args=args,
        train_dataset=prompt_completion_dataset(8),
        processing_class=tokenizer,
        callbacks=[],
    )
    trainer.train()
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    callback = SafeDeltaCallback(safety_data(), config, processing_class=tokenizer)
    trainer = SFTTrainer(
        build_model("llama", seed=0),
        args=args,
        train_dataset=prompt_completion_dataset(8),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    reference = build_model("llama", seed=0)
    reference.load_state_dict(trained)
    safe_delta(reference, safety_data(), config, aligned_model=start, processing_class=tokenizer)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
    assert not torch.equal(
        trainer.model.model.layers[0].mlp.up_proj.weight, trained["model.layers.0.mlp.up_proj.weight"]
    )

    lora_trainer = SFTTrainer(
        build_model("llama", seed=0),
        args=args,
        train_dataset=prompt_completion_dataset(8),
        processing_class=tokenizer,
        peft_config=LoraConfig(**TINY_LORA),
        callbacks=[SafeDeltaCallback(safety_data(), config)],
    )
    with pytest.raises(ValueError, match="trl-safety prune --defense safe-delta"):
        lora_trainer.train()


def test_callback_refuses_zero3_before_training(tmp_path):
    """Under ZeRO-3 (parameters carry DeepSpeed's `ds_id`) whole weights cannot be read: refused at
    `on_train_begin`, not after the run."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = build_model("llama", seed=0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[])
    callback = SafeDeltaCallback(safety_data(), SafeDeltaConfig(), processing_class=build_tokenizer())
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)  # no ZeRO-3: accepted
    next(model.parameters()).ds_id = 0
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    assert get_defense("safe-delta").unsupported_backends == ("zero3",)


def test_registry_entry():
    spec = get_defense("safe-delta")
    assert spec.stage == "post-fine-tuning" and spec.trainer_class is None and spec.config_class is SafeDeltaConfig
    assert SafeDeltaConfig(**spec.neutral_overrides).is_neutral


def test_prune_cli(tmp_path, capsys):
    tokenizer = build_tokenizer()
    aligned, finetuned = finetuned_pair()
    for name, model in (("aligned", aligned), ("finetuned", finetuned)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    safety_data().to_json(tmp_path / "safety.jsonl")
    argv = ["prune", "--defense", "safe-delta", "--model_name_or_path", str(tmp_path / "finetuned"), "--device", "cpu"]
    flags = ["--alignment_dataset_name", str(tmp_path / "safety.jsonl"), "--scale", "0.11", "--budget_ref_dim", "32"]
    # official bug 1: the README's `--s 0.11` was swallowed and s stayed 0.1; here an unknown flag is refused...
    assert (
        main([*argv, "--output_dir", str(tmp_path / "x"), "--aligned_model", str(tmp_path / "aligned"), "--s", "1"])
        == 2
    )
    # ...and a missing aligned model is a one-line error
    assert main([*argv, *flags, "--output_dir", str(tmp_path / "y")]) == 2
    assert "aligned_model" in capsys.readouterr().err
    assert (
        main([*argv, *flags, "--output_dir", str(tmp_path / "out"), "--aligned_model", str(tmp_path / "aligned")]) == 0
    )
    stats = json.loads((tmp_path / "out" / "safe_delta_stats.json").read_text())
    assert stats["scale"] == 0.11  # the flag reaches the algorithm
    info = json.loads((tmp_path / "out" / "defense_config.json").read_text())
    assert info["defense"] == "safe-delta" and info["hyperparameters"]["scale"] == 0.11 and not info["is_adapter"]
    reference = build_model("llama", seed=0)
    reference.load_state_dict(finetuned.state_dict())
    config = SafeDeltaConfig(scale=0.11, budget_ref_dim=32)
    data = Dataset.from_json(str(tmp_path / "safety.jsonl"))
    safe_delta(reference, data, config, aligned_model=aligned, processing_class=tokenizer)
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, value in out.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
