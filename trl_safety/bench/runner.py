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
import logging
import os
import shutil
import time

from .config import BASELINES, STAGE_ORDER, BenchConfig
from .data import BenchData, load_bench_data


logger = logging.getLogger(__name__)


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


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def evaluate(model, data: BenchData, config: BenchConfig, judge):
    """HS and FA of `model` on the run's evaluation sets (an `EvalResult`)."""
    from ..eval import evaluation

    return evaluation.evaluate_model(
        model,
        data.tokenizer,
        harmful_prompts=data.harmful_prompts,
        judge=judge,
        categories=data.categories,
        task=data.task,
        max_new_tokens=config.max_new_tokens,
        task_max_new_tokens=config.task_max_new_tokens,
        batch_size=config.eval_batch_size,
        prompt_format=data.prompt_format,
        progress=False,
    )


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
        self._bar = None

    # --------------------------------------------------------------------------------------------- configuration
    def specs(self) -> list:
        from ..registry import get_defense, list_defenses

        if self.config.defenses is None:
            specs = list_defenses()
        else:
            specs = [get_defense(name) for name in self.config.defenses if name not in BASELINES]
        return sorted(specs, key=lambda s: (STAGE_ORDER[s.stage], s.name))

    def train_values(self, stage: str, name: str) -> dict:
        """The training arguments every stage config gets (a class takes those it has)."""
        c = self.config
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
            seed=c.seed,
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
        # toy-scale hyperparameters; real-model mode keeps the papers' values
        return dict(spec.bench_overrides) if (spec is not None and self.config.toy) else {}

    # ------------------------------------------------------------------------------------------------------ stages
    def train(self, model, stage: str, name: str, spec=None, *, poisoned=None):
        """One training stage through `SFTTrainer` or the defense's trainer; returns the trained model.

        Alignment trains on the alignment data (a `paired_data` defense on the refusals paired with the harmful
        rows); fine-tuning trains on `poisoned`.
        """
        from transformers.trainer_callback import PrinterCallback
        from trl import SFTConfig, SFTTrainer

        from ..toy.model import strip_trainer_patches

        align = stage == "alignment"
        if not align and poisoned is None:
            raise ValueError("A fine-tuning stage needs its `poisoned` dataset.")
        trainer_class = spec.trainer_class if spec is not None else SFTTrainer
        config_class = spec.config_class if spec is not None else SFTConfig
        args = build_stage_config(config_class, self.train_values(stage, name), self._overrides(spec))
        dataset = self.data.alignment if align else poisoned
        if align and spec is not None and spec.paired_data:
            dataset = self.data.paired_alignment  # harmful → refusal rows paired with `self.data.harmful`
        extra = {}
        for role in getattr(trainer_class, "extra_datasets", ()):
            extra[f"{role}_dataset"] = self.data.alignment if role == "alignment" else self.data.harmful
        peft_config = None
        if not _is_peft(model):
            peft_config = self._peft_config(self.config.align_lora_r if align else self.config.lora_r)
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=self.data.tokenizer,
            peft_config=peft_config,
            **extra,
        )
        trainer.remove_callback(PrinterCallback)  # the bench shows its own progress and table
        trainer.train()
        model = strip_trainer_patches(trainer.model)
        del trainer
        shutil.rmtree(args.output_dir, ignore_errors=True)
        return model

    def aligned(self, name: str, spec=None):
        """The aligned model of a row (a fresh copy) and the alignment's wall time; plain SFT alignment is shared."""
        key = name if spec is not None else "sft"
        if key not in self._aligned_cache:
            self._set_bar(key, "align")
            start = time.perf_counter()
            model = self.train(self.data.load_base(), "alignment", key, spec)
            if _is_peft(model) and self.config.lora_mode == "double":
                model = model.merge_and_unload()
            self._aligned_cache[key] = (model, time.perf_counter() - start)
        model, seconds = self._aligned_cache[key]
        return copy.deepcopy(model), seconds

    def repair(self, model, spec, name: str, aligned):
        """The post-fine-tuning defense's `post_hoc` repair of the fine-tuned `model`."""
        post_config = build_stage_config(
            spec.config_class, self.train_values("fine-tuning", name), self._overrides(spec)
        )
        return spec.post_hoc(
            model,
            post_config,
            harmful_dataset=self.data.harmful,
            processing_class=self.data.tokenizer,
            base_model=self.data.load_base(),
            aligned_model=aligned,
            output_dir=os.path.join(self.work_dir, f"{name}-post"),
        )

    def evaluate(self, model):
        """HS and FA of `model` (an `EvalResult`)."""
        return evaluate(model, self.data, self.config, self.judge)

    def _set_bar(self, name: str, stage: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{name}: {stage}")

    def _advance(self, stages: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(stages)

    def run_row(self, name: str, spec, p: float, poisoned) -> dict:
        """One row at harmful ratio `p`, fine-tuned on `poisoned`."""
        row = {"name": name, "defense": spec.name if spec else None, "stage": spec.stage if spec else None, "p": p}
        seconds = {}
        if name == "no-alignment":
            model, seconds["align"] = self.data.load_base(), 0.0
        else:
            model, seconds["align"] = self.aligned(name, spec if spec and spec.stage == "alignment" else None)
        self._advance()
        post_hoc = spec is not None and spec.stage == "post-fine-tuning"
        aligned = copy.deepcopy(model) if post_hoc else None

        self._set_bar(name, f"fine-tune p={p}")
        start = time.perf_counter()
        finetune_spec = spec if spec and spec.stage == "fine-tuning" else None
        model = self.train(model, "fine-tuning", name, finetune_spec, poisoned=poisoned)
        seconds["finetune"] = time.perf_counter() - start
        self._advance()

        if post_hoc:
            self._set_bar(name, "post-fine-tuning")
            start = time.perf_counter()
            model = self.repair(model, spec, name, aligned)
            seconds["post"] = time.perf_counter() - start
            del aligned

        self._set_bar(name, "evaluate")
        start = time.perf_counter()
        result = self.evaluate(model)
        seconds["eval"] = time.perf_counter() - start
        self._advance()
        row.update(
            harmful_score=result.harmful_score,
            finetune_accuracy=result.finetune_accuracy,
            seconds={k: round(v, 2) for k, v in seconds.items()},
        )
        row["per_category"] = result.per_category
        return row

    def calibrate(self) -> dict:
        """The threat-model checks before the grid: the base, the SFT-aligned model, SFT on clean data (p=0)."""
        start = time.perf_counter()
        self._set_bar("base", "evaluate")
        base = self.evaluate(self.data.load_base())
        self._advance()
        aligned, _ = self.aligned("sft")
        aligned_result = self.evaluate(aligned)
        self._advance()
        self._set_bar("sft", "fine-tune p=0")
        clean = self.train(aligned, "fine-tuning", "sft-clean", poisoned=self.data.poisoned(0.0))
        clean_result = self.evaluate(clean)
        self._advance()
        return {
            "base": base,
            "aligned": aligned_result,
            "clean": clean_result,
            "seconds": time.perf_counter() - start,
        }

    def _failed_row(self, name: str, spec, p: float, error: str) -> dict:
        return {
            "name": name,
            "defense": spec.name if spec else None,
            "stage": spec.stage if spec else None,
            "p": p,
            "harmful_score": None,
            "finetune_accuracy": None,
            "seconds": {},
            "error": error,
        }

    # --------------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        """Calibration, then every row at every ratio; returns the `results.json` content."""
        from tqdm.auto import tqdm

        c = self.config
        grid = [("sft", None), ("no-alignment", None)] + [(s.name, s) for s in self.specs()]
        ratios = c.ratios
        total = 3 + 3 * len(grid) * len(ratios)  # calibration (base, aligned, clean) + 3 stages per row
        self._bar = tqdm(total=total, desc="trl-safety bench", disable=not c.progress, unit="stage")
        rows, errors = [], {}
        try:
            calibration = self.calibrate()
            for p in ratios:
                poisoned = self.data.poisoned(p)
                for name, spec in grid:
                    try:
                        rows.append(self.run_row(name, spec, p, poisoned))
                    except Exception as exc:  # one broken defense must not hide the others' results
                        logger.warning("Bench row %s (p=%s) failed: %s: %s", name, p, type(exc).__name__, exc)
                        logger.debug("Traceback of the failed row %s", name, exc_info=True)
                        errors[f"{name}@{p}"] = f"{type(exc).__name__}: {exc}"
                        rows.append(self._failed_row(name, spec, p, errors[f"{name}@{p}"]))
                        self._advance(3)
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
