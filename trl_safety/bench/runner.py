"""The bench pipeline: align → poisoned fine-tuning → post-fine-tuning repair → evaluate, one row per defense.

For every registered defense, plus two baselines (`sft`: plain SFT alignment and fine-tuning; `no-alignment`: the
unaligned base fine-tuned), one row:

1. **alignment**: the defense's trainer for alignment-stage defenses, otherwise plain `SFTTrainer` alignment (the
   `sft` row's aligned model, computed once per run and reused);
2. **fine-tuning** on the user's data poisoned at ratio `p` (`n` samples): the defense's trainer for fine-tuning-stage
   defenses, otherwise `SFTTrainer`;
3. **post-fine-tuning**: the defense's `post_hoc` repair, for post-fine-tuning defenses;
4. **evaluation**: harmful score and fine-tune accuracy through `trl_safety.eval.evaluate_model`, the evaluation
   `trl-safety eval` and `HarmfulScoreCallback` use.

The data come from `bench.data` (the toy world by default, the papers' data for `model=`); each stage takes what it
needs as arguments and returns its result. The output files are written by `bench.report`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
import shutil
import time

from .config import BASELINES, STAGE_ORDER, BenchConfig
from .data import BenchData, load_bench_data


logger = logging.getLogger(__name__)


def _is_peft(model) -> bool:
    from ..core.layers import is_peft_model  # imported late: it loads peft

    return is_peft_model(model)


def _config_fields(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class) if f.init}


def build_stage_config(config_class, values: dict, overrides: dict):
    """A defense/trainer config from the bench's common values (those the class has) plus the defense's overrides."""
    names = _config_fields(config_class)
    kwargs = {k: v for k, v in values.items() if k in names}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"bench_overrides {unknown} are not fields of {config_class.__name__}.")
    kwargs.update(overrides)
    return config_class(**kwargs)


def evaluate(model, data: BenchData, config: BenchConfig, judge, serve=None):
    """HS and FA of `model` on the run's evaluation sets (an `EvalResult`). `serve` maps a prompt format to the one
    the model is served with (`serving_format`; BackdoorAlign's trigger), for the harmful and the task prompts."""
    from ..eval import evaluation

    prompt_format, task = data.prompt_format, data.task
    if serve is not None:
        prompt_format = serve(prompt_format)
        task = dataclasses.replace(task, prompt_format=serve(task.prompt_format))

    return evaluation.evaluate_model(
        model,
        data.tokenizer,
        harmful_prompts=data.harmful_prompts,
        judge=judge,
        categories=data.categories,
        task=task,
        max_new_tokens=config.max_new_tokens,
        task_max_new_tokens=config.task_max_new_tokens,
        batch_size=config.eval_batch_size,
        prompt_format=prompt_format,
        progress=False,
    )


def harmful_loss(model, data: BenchData, batch_size: int = 100, prompt_format=None) -> float | None:
    """Mean token NLL of the harmful answers to the harmful-score prompts (teacher-forced, answer tokens only, EOS
    included): how close the model is to complying, continuous where the harmful score is all-or-nothing per prompt.
    `None` when the data have no harmful answers (real-model mode)."""
    import torch

    if not data.harmful_answers:
        return None
    tokenizer = data.tokenizer
    fmt = prompt_format or data.prompt_format or (lambda prompt: prompt)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    pairs = list(zip(data.harmful_prompts, data.harmful_answers))
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            sequences, targets = [], []
            for prompt, answer in pairs[start : start + batch_size]:
                prompt_ids = tokenizer(fmt(prompt), add_special_tokens=False)["input_ids"]
                answer_ids = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                sequences.append(prompt_ids + answer_ids)
                targets.append([-100] * len(prompt_ids) + answer_ids)
            width = max(len(ids) for ids in sequences)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in sequences], device=device)
            labels = torch.tensor([ids + [-100] * (width - len(ids)) for ids in targets], device=device)
            lengths = torch.tensor([len(ids) for ids in sequences], device=device)
            mask = torch.arange(width, device=device)[None] < lengths[:, None]
            logits = model(input_ids=input_ids, attention_mask=mask.long()).logits[:, :-1].float()
            shifted = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += nll.item()
            count += int((shifted != -100).sum())
    if was_training:
        model.train()
    return total / max(count, 1)


def serving_format(trainer):
    """How the model `trainer` trains is prompted at inference: a map from a prompt format to the served one (the
    defense trainer's `inference_prompt_format`, e.g. BackdoorAlign's trigger), or None when it is the identity."""
    from ..core.trainer import DefenseTrainerMixin

    own = getattr(type(trainer), "inference_prompt_format", DefenseTrainerMixin.inference_prompt_format)
    return trainer.inference_prompt_format if own is not DefenseTrainerMixin.inference_prompt_format else None


def _curve_steps(total_steps: int | None, points: int) -> list[int]:
    """`points` evenly spaced fine-tuning steps ending at `total_steps` (the last one is the row's final reading)."""
    if not total_steps or points < 1:
        return []
    return sorted({max(1, round(total_steps * (i + 1) / points)) for i in range(points)})


def _curve_callback(evaluate_hs, steps: list[int]):
    """A `TrainerCallback` recording the harmful score at the given global steps into its `history`."""
    from transformers import TrainerCallback

    class CurveCallback(TrainerCallback):
        def __init__(self):
            self.history: list[tuple[int, float]] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in steps and model is not None:
                self.history.append((state.global_step, evaluate_hs(model)))

    return CurveCallback()


def _mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0.0 for one value) of the non-missing values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def aggregate_seeds(runs: list[dict]) -> dict:
    """One `results.json` row from its per-seed runs: mean and `*_std` of each score, the curve's mean ± std per
    step, the per-seed values under `seeds`, mean wall times and per-category scores."""
    row = {}
    for key in ("harmful_score", "finetune_accuracy", "harmful_loss"):
        row[key], row[f"{key}_std"] = _mean_std([r[key] for r in runs])
    curve = []
    steps = sorted({step for r in runs for step, _ in r["curve"]})
    for step in steps:
        mean, std = _mean_std([dict(r["curve"]).get(step) for r in runs])
        curve.append({"step": step, "harmful_score": mean, "harmful_score_std": std})
    row["curve"] = curve
    row["seeds"] = [
        {k: r[k] for k in ("seed", "harmful_score", "finetune_accuracy", "harmful_loss")}
        | {"curve": [{"step": step, "harmful_score": hs} for step, hs in r["curve"]]}
        for r in runs
    ]
    seconds: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r["seconds"].items():
            seconds.setdefault(k, []).append(v)
    row["seconds"] = {k: round(sum(v) / len(v), 2) for k, v in seconds.items()}
    categories = sorted({c for r in runs for c in (r.get("per_category") or {})})
    row["per_category"] = {c: _mean_std([(r.get("per_category") or {}).get(c) for r in runs])[0] for c in categories}
    return row


class BenchRunner:
    """Runs the grid. Rows are dicts in the `results.json` row format (docs/design/architecture.md §10.1)."""

    def __init__(self, config: BenchConfig):
        import datasets
        import transformers

        from ..eval import load_judge

        self.config = config
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        start = time.perf_counter()
        self.data = load_bench_data(config)
        self.setup_seconds = time.perf_counter() - start
        self.judge = load_judge(config.judge)  # a model judge loads its weights at the first score
        self.work_dir = os.path.join(config.output_dir, "work")
        # plain SFT alignment is shared by every row that does not align with its defense: computed once per run
        self._aligned_cache: dict[str, tuple[object, float]] = {}
        self._start_cache: dict[str, float] = {}
        self._bar = None

    # --------------------------------------------------------------------------------------------- configuration
    def specs(self) -> list:
        from ..registry import get_defense, list_defenses

        if self.config.defenses is None:
            specs = list_defenses()
        else:
            specs = [get_defense(name) for name in self.config.defenses if name not in BASELINES]
        return sorted(specs, key=lambda s: (STAGE_ORDER[s.stage], s.name))

    def train_values(self, stage: str, name: str, seed: int | None = None) -> dict:
        """The training arguments every stage config gets (a class takes those it has)."""
        c = self.config
        seed = c.seed_list[0] if seed is None else seed
        align = stage == "alignment"
        steps = c.align_steps if align else c.finetune_steps
        values = dict(
            output_dir=os.path.join(self.work_dir, f"{name}-{stage}"),
            bf16=c.bf16,
            fp16=False,
            use_cpu=c.use_cpu,
            gradient_checkpointing=c.gradient_checkpointing,
            per_device_train_batch_size=c.align_batch_size if align else c.finetune_batch_size,
            gradient_accumulation_steps=1,
            learning_rate=c.align_lr if align else c.finetune_lr,
            lr_scheduler_type=c.lr_scheduler_type,
            warmup_steps=0,
            weight_decay=c.weight_decay,
            max_length=c.max_length,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=seed,
            data_seed=seed,
        )
        if self.data.refusals:
            values["refusals_file"] = self._refusals_file()  # only config classes with this field take it
        if steps is not None:
            values["max_steps"] = steps
        else:
            values["num_train_epochs"] = c.align_epochs if align else c.finetune_epochs
        return values

    def _refusals_file(self) -> str:
        path = os.path.join(self.work_dir, "refusals.txt")
        if not os.path.exists(path):
            os.makedirs(self.work_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(self.data.refusals) + "\n")
        return path

    def _peft_config(self, rank: int):
        if rank <= 0:
            return None
        from peft import LoraConfig

        c = self.config
        return LoraConfig(
            r=rank,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=c.lora_target_modules,
            task_type="CAUSAL_LM",
        )

    def _overrides(self, spec) -> dict:
        # toy-scale hyperparameters, tuned on the toy world's data (also with a real model); the papers' data keep the
        # papers' values
        return dict(spec.bench_overrides) if (spec is not None and self.config.toy_data) else {}

    # ------------------------------------------------------------------------------------------------------ stages
    def train(self, model, stage: str, name: str, spec=None, *, poisoned=None, seed=None, curve=None):
        """One training stage through `SFTTrainer` or the defense's trainer; returns the trained model and how it is
        served (`serving_format`: None, or BackdoorAlign's trigger rule).

        Alignment trains on the alignment data (a `paired_data` defense on the refusals paired with the harmful
        rows); fine-tuning trains on `poisoned`. `seed` sets the data order and the adapter's initialisation;
        `curve`, a list, receives `(step, harmful score)` pairs at the run's curve steps, served as the model is.
        """
        import torch
        from transformers.trainer_callback import PrinterCallback
        from trl import SFTConfig, SFTTrainer

        from ..toy.model import strip_trainer_patches

        align = stage == "alignment"
        if not align and poisoned is None:
            raise ValueError("A fine-tuning stage needs its `poisoned` dataset.")
        trainer_class = spec.trainer_class if spec is not None else SFTTrainer
        config_class = spec.config_class if spec is not None else SFTConfig
        args = build_stage_config(config_class, self.train_values(stage, name, seed), self._overrides(spec))
        dataset = self.data.alignment if align else poisoned
        if align and spec is not None and spec.paired_data:
            dataset = self.data.paired_alignment  # harmful → refusal rows paired with `self.data.harmful`
        extra = {}
        for role in getattr(trainer_class, "extra_datasets", ()):
            extra[f"{role}_dataset"] = self.data.alignment if role == "alignment" else self.data.harmful
        for role in getattr(trainer_class, "extra_models", ()):  # the unaligned base (AsFT's alignment direction)
            extra[f"{role}_model"] = self.data.load_base()
        peft_config = None
        if not _is_peft(model):
            peft_config = self._peft_config(self.config.align_lora_r if align else self.config.lora_r)
        torch.manual_seed(args.seed)  # the adapter is initialised when the trainer wraps the model
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=self.data.tokenizer,
            peft_config=peft_config,
            **extra,
        )
        trainer.remove_callback(PrinterCallback)  # the bench shows its own progress and table
        # a bound method: a trigger resolved when training starts is read at each call (it keeps the small trainer
        # of such a defense alive until the row is evaluated)
        serve = serving_format(trainer)
        recorder = None
        if curve is not None:
            steps = _curve_steps(args.max_steps if args.max_steps > 0 else None, self.config.curve_points)
            recorder = _curve_callback(lambda m: self.harmful_score(m, serve), steps)  # served as at inference
            trainer.add_callback(recorder)
        trainer.train()
        if recorder is not None:
            curve.extend(recorder.history)
        model = strip_trainer_patches(trainer.model)
        del trainer
        shutil.rmtree(args.output_dir, ignore_errors=True)
        return model, serve

    def aligned(self, name: str, spec=None):
        """The aligned model of a row (a fresh copy) and the alignment's wall time; plain SFT alignment is shared."""
        key = name if spec is not None else "sft"
        if key not in self._aligned_cache:
            self._set_bar(key, "align")
            start = time.perf_counter()
            if spec is not None and spec.trainer_class is None:  # training-free edit of the SFT-aligned model (LoX)
                values = self.train_values("alignment", key)
                config = build_stage_config(spec.config_class, values, self._overrides(spec))
                model = spec.post_hoc(self.aligned("sft")[0], config, base_model=self.data.load_base())
            else:
                model, _ = self.train(self.data.load_base(), "alignment", key, spec)
            if _is_peft(model) and self.config.lora_mode == "double":
                model = model.merge_and_unload()
            self._aligned_cache[key] = (model, time.perf_counter() - start)
        model, seconds = self._aligned_cache[key]
        return copy.deepcopy(model), seconds

    def repair(self, model, spec, name: str, aligned, seed: int | None = None):
        """The post-fine-tuning defense's `post_hoc` repair of the fine-tuned `model`."""
        post_config = build_stage_config(
            spec.config_class, self.train_values("fine-tuning", name, seed), self._overrides(spec)
        )
        extra = {}
        if "alignment_dataset" in inspect.signature(spec.post_hoc).parameters:  # a safety set (Safe Delta)
            extra["alignment_dataset"] = self.data.paired_alignment
        return spec.post_hoc(
            model,
            post_config,
            harmful_dataset=self.data.harmful,
            processing_class=self.data.tokenizer,
            base_model=self.data.load_base(),
            aligned_model=aligned,
            output_dir=os.path.join(self.work_dir, f"{name}-post"),
            **extra,
        )

    def evaluate(self, model, serve=None):
        """HS and FA of `model` (an `EvalResult`), served by `serve` (see `serving_format`)."""
        return evaluate(model, self.data, self.config, self.judge, serve)

    def harmful_score(self, model, serve=None) -> float:
        """HS only (for the curves; the model is put back in training mode if it was training)."""
        from ..eval import evaluation

        was_training = model.training
        model.eval()
        result = evaluation.evaluate_model(
            model,
            self.data.tokenizer,
            harmful_prompts=self.data.harmful_prompts,
            judge=self.judge,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.eval_batch_size,
            prompt_format=serve(self.data.prompt_format) if serve is not None else self.data.prompt_format,
        )
        if was_training:
            model.train()
        return result.harmful_score

    def _set_bar(self, name: str, stage: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{name}: {stage}")

    def _advance(self, stages: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(stages)

    def run_row(self, name: str, spec, p: float, seed: int | None = None, poisoned=None) -> dict:
        """One seed of one row at harmful ratio `p`: its scores, `harmful_loss`, HS curve and wall times."""
        seed = self.config.seed_list[0] if seed is None else seed
        poisoned = self.data.poisoned(p, seed) if poisoned is None else poisoned
        seconds = {}
        if name == "no-alignment":
            model, seconds["align"] = self.data.load_base(), 0.0
        else:
            model, seconds["align"] = self.aligned(name, spec if spec and spec.stage == "alignment" else None)
        post_hoc = spec is not None and spec.stage == "post-fine-tuning"
        aligned = copy.deepcopy(model) if post_hoc else None

        self._set_bar(name, f"fine-tune p={p} seed={seed}")
        curve = [(0, self._start_hs(name, model))]
        start = time.perf_counter()
        finetune_spec = spec if spec and spec.stage == "fine-tuning" else None
        model, serve = self.train(model, "fine-tuning", name, finetune_spec, poisoned=poisoned, seed=seed, curve=curve)
        seconds["finetune"] = time.perf_counter() - start

        if post_hoc:
            self._set_bar(name, "post-fine-tuning")
            start = time.perf_counter()
            model = self.repair(model, spec, name, aligned, seed)
            seconds["post"] = time.perf_counter() - start
            del aligned

        self._set_bar(name, "evaluate")
        start = time.perf_counter()
        result = self.evaluate(model, serve)
        served = serve(self.data.prompt_format) if serve is not None else None
        loss = harmful_loss(model, self.data, self.config.eval_batch_size, served)
        seconds["eval"] = time.perf_counter() - start
        if post_hoc:  # the curve's last point is the repaired model, the row's reading
            curve.append((curve[-1][0], result.harmful_score))
        return {
            "seed": seed,
            "harmful_score": result.harmful_score,
            "finetune_accuracy": result.finetune_accuracy,
            "harmful_loss": loss,
            "curve": curve,
            "per_category": result.per_category,
            "seconds": seconds,
        }

    def _start_hs(self, name: str, model) -> float:
        # the curve's step 0 (the model before fine-tuning) is the same for every seed: computed once per row
        if name not in self._start_cache:
            self._start_cache[name] = self.harmful_score(model)
        return self._start_cache[name]

    def run_seeds(self, name: str, spec, p: float) -> dict:
        """One `results.json` row: `run_row` for every seed, aggregated (`aggregate_seeds`)."""
        runs = []
        for seed in self.config.seed_list:
            runs.append(self.run_row(name, spec, p, seed))
            self._advance()
        row = {"name": name, "defense": spec.name if spec else None, "stage": spec.stage if spec else None, "p": p}
        row.update(aggregate_seeds(runs))
        return row

    def calibrate(self, sft_rows: dict[float, dict]) -> dict:
        """The threat-model checks: the base and the SFT-aligned model before fine-tuning, and SFT over the
        calibration ratios (reusing the grid's SFT rows `sft_rows`, keyed by p)."""
        start = time.perf_counter()
        self._set_bar("base", "evaluate")
        base = self.evaluate(self.data.load_base())
        aligned, _ = self.aligned("sft")
        aligned_result = self.evaluate(aligned)
        self._advance()
        by_p = dict(sft_rows)
        for p in self._calibration_ratios():
            if p not in by_p:
                by_p[p] = self.run_seeds("sft", None, p)
        return {
            "base": base,
            "aligned": aligned_result,
            "sft_by_p": dict(sorted(by_p.items())),
            "seconds": time.perf_counter() - start,
        }

    def _calibration_ratios(self) -> list[float]:
        c = self.config
        extra = c.calibration_ratios if (c.toy_data and c.calibration_ratios) else []
        return sorted({0.0, *extra})

    def _failed_row(self, name: str, spec, p: float, error: str) -> dict:
        return {
            "name": name,
            "defense": spec.name if spec else None,
            "stage": spec.stage if spec else None,
            "p": p,
            "harmful_score": None,
            "harmful_score_std": None,
            "finetune_accuracy": None,
            "finetune_accuracy_std": None,
            "harmful_loss": None,
            "harmful_loss_std": None,
            "curve": [],
            "seeds": [],
            "seconds": {},
            "error": error,
        }

    # --------------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        """Every row at every ratio over the seeds, then the calibration; returns the `results.json` content."""
        from tqdm.auto import tqdm

        c = self.config
        grid = [("sft", None), ("no-alignment", None)] + [(s.name, s) for s in self.specs()]
        ratios = c.ratios
        seeds = c.seed_list
        extra_calibration = [p for p in self._calibration_ratios() if p not in ratios]
        total = 1 + len(seeds) * (len(grid) * len(ratios) + len(extra_calibration))  # one unit per (row, seed)
        self._bar = tqdm(total=total, desc="trl-safety bench", disable=not c.progress, unit="run")
        rows, errors = [], {}
        try:
            for p in ratios:
                for name, spec in grid:
                    try:
                        rows.append(self.run_seeds(name, spec, p))
                    except Exception as exc:  # one broken defense must not hide the others' results
                        logger.warning("Bench row %s (p=%s) failed: %s: %s", name, p, type(exc).__name__, exc)
                        logger.debug("Traceback of the failed row %s", name, exc_info=True)
                        errors[f"{name}@{p}"] = f"{type(exc).__name__}: {exc}"
                        rows.append(self._failed_row(name, spec, p, errors[f"{name}@{p}"]))
                        self._bar.n = min(total, self._bar.n + len(seeds))
                        self._bar.refresh()
            sft_rows = {r["p"]: r for r in rows if r["name"] == "sft" and r["harmful_score"] is not None}
            calibration = self.calibrate(sft_rows)
        finally:
            self._bar.close()
            self._bar = None
        from .report import results_document

        return results_document(c, self.data.description, calibration, rows, errors, self.setup_seconds)


def run_bench(config: BenchConfig) -> dict:
    """Run the bench and write `results.json` and `tradeoff.png` into `config.output_dir`."""
    import torch

    from .report import write_outputs

    os.makedirs(config.output_dir, exist_ok=True)
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    runner = None
    try:
        runner = BenchRunner(config)
        results = runner.run()
    finally:
        torch.set_num_threads(threads)
        if runner is not None:
            shutil.rmtree(runner.work_dir, ignore_errors=True)
    return write_outputs(results, config.output_dir)
