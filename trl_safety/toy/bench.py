"""The benchmark pipeline behind `trl-safety bench`: align → poisoned fine-tuning → post-fine-tuning repair → evaluate.

For every registered defense, plus two baselines (`sft`: plain SFT alignment and fine-tuning; `no-alignment`: the
unaligned base fine-tuned), one row:

1. **alignment**: the defense's trainer for alignment-stage defenses, otherwise plain `SFTTrainer` alignment (the
   `sft` row's aligned model, computed once per run and reused);
2. **fine-tuning** on the user's data poisoned at ratio `p` (`n` samples): the defense's trainer for fine-tuning-stage
   defenses, otherwise `SFTTrainer`;
3. **post-fine-tuning**: the defense's `post_hoc` repair, for post-fine-tuning defenses;
4. **evaluation**: harmful score (percent of held-out harmful prompts answered without refusing, greedy decoding,
   through `trl_safety.eval.harmful_score` with the configured judge) and fine-tune accuracy (exact match on the
   task's test split).

By default everything runs in the embedded toy world (`trl_safety.toy.world`) on CPU in minutes; `model=` and the
dataset fields switch to a real model and the papers' data (docs/design/algorithms.md §6.5) on a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass


logger = logging.getLogger(__name__)

BASELINES = ("sft", "no-alignment")
STAGE_ORDER = {"alignment": 0, "fine-tuning": 1, "post-fine-tuning": 2}


@dataclass
class BenchConfig:
    """Settings of a bench run. Toy-world defaults; `model` switches to real-model mode (see `real_defaults`)."""

    defenses: list[str] | None = None  # None: every registered defense
    p: float = 0.1
    sweep: list[float] | None = None  # several harmful ratios (the run's `p` is always included)
    n: int = 1000
    seed: int = 0
    output_dir: str = "bench-out"
    progress: bool = True
    # toy world
    world_seed: int = 0
    cache_dir: str | None = None
    num_alignment: int = 400  # harmful → refusal rows (plus as many benign → helpful rows)
    num_harmful: int = 400  # harmful → compliance rows handed to defenses (alignment split, disjoint from the attack)
    num_eval_prompts: int = 200
    num_task_test: int = 200
    # training
    align_steps: int | None = 60
    align_epochs: float = 1.0  # used when align_steps is None
    align_lr: float = 1e-3
    align_batch_size: int = 32
    finetune_steps: int | None = 60
    finetune_epochs: float = 1.0  # used when finetune_steps is None
    finetune_lr: float = 2e-4
    finetune_batch_size: int = 32
    max_length: int = 64
    lr_scheduler_type: str = "constant"
    weight_decay: float = 0.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    use_cpu: bool = True
    # LoRA: rank 0 means full fine-tuning
    align_lora_r: int = 0
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    lora_mode: str = (
        "double"  # double: merge the alignment adapter, fresh adapter for fine-tuning; single: continue it
    )
    # evaluation
    judge: str = "keyword"
    max_new_tokens: int = 8
    task_max_new_tokens: int = 3
    eval_batch_size: int = 100
    # real-model mode
    model: str | None = None
    alignment_dataset: str | None = None
    alignment_dataset_config: str | None = None
    harmful_dataset: str | None = None
    harmful_dataset_config: str | None = None
    eval_dataset: str | None = None
    task: str | None = None  # real mode: sst2 / agnews / gsm8k (the toy task is its own sentiment task)
    task_dataset: str | None = None
    template: str | None = None  # real mode: alpaca / alpaca_newline / chat (the toy world has its own format)
    torch_dtype: str | None = None
    # torch intra-op threads (toy default 1: its matrices are too small to gain from more, and with other processes on
    # the cores OpenMP's spinning threads make 2 threads ~10x slower than 1); None leaves torch's setting
    num_threads: int | None = 1
    # toy base model: pretraining steps (None: the recipe's default; another value is cached separately)
    base_pretrain_steps: int | None = None

    @property
    def toy(self) -> bool:
        return self.model is None

    @property
    def ratios(self) -> list[float]:
        ratios = sorted({*(self.sweep or []), self.p})
        return ratios


def real_defaults() -> dict:
    """The canonical protocol for real models (docs/design/algorithms.md §6.5, Booster's setting)."""
    return dict(
        model="meta-llama/Llama-2-7b-hf",
        alignment_dataset="anonymous4486/repnoise_beavertail",
        harmful_dataset="PKU-Alignment/BeaverTails",
        num_alignment=5000,
        num_harmful=5000,
        num_eval_prompts=1000,
        num_task_test=872,
        align_steps=None,
        align_epochs=20,
        align_lr=5e-4,
        align_batch_size=10,
        finetune_steps=None,
        finetune_epochs=20,
        finetune_lr=1e-5,
        finetune_batch_size=10,
        max_length=256,
        weight_decay=0.1,
        bf16=True,
        use_cpu=False,
        align_lora_r=32,
        lora_r=32,
        lora_alpha=4,
        lora_target_modules=["q_proj", "k_proj", "v_proj"],
        lora_mode="single",
        judge="beaver-dam",
        max_new_tokens=512,
        task_max_new_tokens=16,
        num_threads=None,
        eval_batch_size=16,
        task="sst2",
        template="alpaca_newline",
    )


# ------------------------------------------------------------------------------------------------------------ data
class BenchData:
    """Everything the pipeline needs from a world: models, datasets, prompts, scorers."""

    def __init__(self, config: BenchConfig):
        self.config = config

    # subclasses fill these
    tokenizer = None
    alignment = None  # harmful → refusal (+ benign → helpful)
    harmful = None  # harmful → harmful answer, for defenses (disjoint from the attack rows)
    paired_alignment = None  # harmful → refusal only, row i paired with `harmful` row i (`DefenseSpec.paired_data`)
    refusals: list[str] | None = (
        None  # the world's refusal sentences for defenses with a `refusals_file` (None: theirs)
    )
    eval_prompts: list[str] = []
    eval_categories: list | None = None
    prompt_format = None

    def load_base(self):
        raise NotImplementedError

    def poisoned(self, p: float):
        raise NotImplementedError

    def finetune_accuracy(self, model) -> float:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}


def toy_recipe(config: BenchConfig):
    """The base-model recipe of a toy run (the default one unless `base_pretrain_steps` is set)."""
    from .model import BaseModelRecipe

    recipe = BaseModelRecipe()
    if config.base_pretrain_steps is not None:
        recipe = dataclasses.replace(recipe, pretrain_steps=config.base_pretrain_steps)
    return recipe


class ToyBenchData(BenchData):
    def __init__(self, config: BenchConfig):
        super().__init__(config)
        from .model import load_base_model
        from .world import REFUSALS, ToyWorld, format_prompt

        self.world = ToyWorld(config.world_seed)
        start = time.perf_counter()
        self._base, self.tokenizer, self.base_path = load_base_model(
            config.cache_dir, config.world_seed, toy_recipe(config)
        )
        self.base_seconds = time.perf_counter() - start
        self.alignment = self.world.alignment_dataset(config.num_alignment, config.num_alignment, seed=config.seed)
        self.harmful = self.world.harmful_dataset("align", config.num_harmful, seed=config.seed)
        self.paired_alignment = self.world.paired_refusal_dataset(config.num_harmful, seed=config.seed)
        # A defense's own refusal pool is out of the toy vocabulary (mostly `<unk>`): give it the world's refusals
        self.refusals = list(REFUSALS)
        prompts = self.world.harmful_prompts("eval", config.num_eval_prompts, seed=config.seed)
        self.eval_prompts = [r.text for r in prompts]
        self.eval_categories = [r.category for r in prompts]
        self.task_examples = self.world.task_examples("test", config.num_task_test, seed=config.seed)
        self.prompt_format = format_prompt

    def load_base(self):
        return copy.deepcopy(self._base)

    def poisoned(self, p: float):
        return self.world.poisoned_dataset(self.config.n, p, seed=self.config.seed)

    def finetune_accuracy(self, model) -> float:
        from ..eval import generate_responses, task_accuracy

        outputs = generate_responses(
            model,
            self.tokenizer,
            [prompt for prompt, _ in self.task_examples],
            prompt_format=self.prompt_format,
            max_new_tokens=self.config.task_max_new_tokens,
            batch_size=self.config.eval_batch_size,
            progress=False,
        )
        # The toy labels are SST2's words, so SST2's exact-match rule applies unchanged
        return task_accuracy("sst2", outputs, [label for _, label in self.task_examples]).accuracy

    def describe(self) -> dict:
        return {"world": "toy", "world_seed": self.config.world_seed, "base_model": self.base_path}


class RealBenchData(BenchData):
    """The papers' protocol: paired-refusal alignment data, BeaverTails attack and HS prompts, a task's splits."""

    def __init__(self, config: BenchConfig):
        super().__init__(config)
        from transformers import AutoTokenizer

        from ..data import (
            BEAVERTAILS_ID,
            REPNOISE_REFUSALS_ID,
            beavertails_dataset,
            beavertails_eval_prompts,
            load_task_dataset,
            parse_adapter_options,
            repnoise_refusal_dataset,
        )
        from ..data.adapters import TASK_TEST_SPLITS
        from ..data.templates import prompt_formatter

        c = config
        self.tokenizer = AutoTokenizer.from_pretrained(c.model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        source = c.alignment_dataset or REPNOISE_REFUSALS_ID
        options = parse_adapter_options(c.alignment_dataset_config)
        options.setdefault("template", c.template)
        if source == REPNOISE_REFUSALS_ID or os.path.exists(source):
            self.alignment = repnoise_refusal_dataset(
                "alignment", source=source, num_samples=c.num_alignment, **options
            )
            # Harmful data for defenses: the same prompts with their harmful answers (as in Booster)
            self.harmful = repnoise_refusal_dataset("harmful", source=source, num_samples=c.num_harmful, **options)
            # the refusals are already paired with the harmful rows by file order
            self.paired_alignment = self.alignment.select(range(min(len(self.alignment), len(self.harmful))))
        else:
            raise ValueError(f"Unsupported alignment dataset {source!r}: give the paired-refusal file or its Hub id.")
        harmful_source = c.harmful_dataset or BEAVERTAILS_ID
        harmful_options = parse_adapter_options(c.harmful_dataset_config)
        harmful_options.setdefault("template", c.template)
        self._attack_pool = beavertails_dataset(
            "harmful", "train", source=harmful_source, num_samples=round(c.n * max(c.ratios)), **harmful_options
        )
        eval_source = c.eval_dataset or harmful_source
        prompts = beavertails_eval_prompts("test", source=eval_source, num_samples=c.num_eval_prompts)
        self.eval_prompts = list(prompts["prompt"])
        self.eval_categories = list(prompts["category"])
        self.prompt_format = prompt_formatter(c.template, self.tokenizer)
        task_source = {"source": c.task_dataset} if c.task_dataset else {}
        self._user_pool = load_task_dataset(c.task, "train", num_samples=c.n, template=c.template, **task_source)
        test_split = TASK_TEST_SPLITS.get(c.task.lower(), ("test", None))[0]
        self._task_test = load_task_dataset(
            c.task, test_split, num_samples=c.num_task_test, template=c.template, **task_source
        )

    def load_base(self):
        import torch
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, self.config.torch_dtype) if self.config.torch_dtype else None
        model = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def poisoned(self, p: float):
        from ..data import mix_harmful

        return mix_harmful(self._user_pool, self._attack_pool, n=self.config.n, p=p, seed=self.config.seed)

    def finetune_accuracy(self, model) -> float:
        from ..eval import finetune_accuracy

        result = finetune_accuracy(
            model,
            self.tokenizer,
            self.config.task,
            self._task_test,
            max_new_tokens=self.config.task_max_new_tokens,
            batch_size=self.config.eval_batch_size,
            progress=False,
        )
        return result.accuracy

    def describe(self) -> dict:
        return {"world": "real", "model": self.config.model}


# -------------------------------------------------------------------------------------------------------- pipeline
def strip_trainer_patches(model):
    from .model import strip_trainer_patches as strip

    return strip(model)


def _config_fields(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class) if f.init}


def _build_config(config_class, values: dict, overrides: dict):
    """A defense/trainer config from the bench's common values (those the class has) plus the defense's overrides."""
    names = _config_fields(config_class)
    kwargs = {k: v for k, v in values.items() if k in names}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"bench_overrides {unknown} are not fields of {config_class.__name__}.")
    kwargs.update(overrides)
    return config_class(**kwargs)


class BenchRunner:
    """Runs the grid. Rows are dicts in the `results.json` row format."""

    def __init__(self, config: BenchConfig):
        import datasets
        import transformers

        self.config = config
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        start = time.perf_counter()
        self.data = ToyBenchData(config) if config.toy else RealBenchData(config)
        self.setup_seconds = time.perf_counter() - start
        self.work_dir = os.path.join(config.output_dir, "work")
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

    def _train_values(self, stage: str, name: str) -> dict:
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

    # ------------------------------------------------------------------------------------------------------ stages
    def _train(self, model, stage: str, name: str, spec=None):
        """One training stage through `SFTTrainer` or the defense's trainer; returns the trained model."""
        from transformers.trainer_callback import PrinterCallback
        from trl import SFTConfig, SFTTrainer

        align = stage == "alignment"
        trainer_class = spec.trainer_class if spec is not None else SFTTrainer
        config_class = spec.config_class if spec is not None else SFTConfig
        overrides = dict(spec.bench_overrides) if (spec is not None and self.config.toy) else {}
        args = _build_config(config_class, self._train_values(stage, name), overrides)
        dataset = self.data.alignment if align else self._poisoned
        if align and spec is not None and getattr(spec, "paired_data", False):
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
            model = self._train(self.data.load_base(), "alignment", key, spec)
            if _is_peft(model) and self.config.lora_mode == "double":
                model = model.merge_and_unload()
            self._aligned_cache[key] = (model, time.perf_counter() - start)
        model, seconds = self._aligned_cache[key]
        return copy.deepcopy(model), seconds

    def evaluate(self, model) -> tuple[float, float, dict]:
        from ..eval import harmful_score, load_judge

        c = self.config
        if not hasattr(self, "_judge"):
            self._judge = load_judge(c.judge)
        result = harmful_score(
            model,
            self.data.tokenizer,
            self.data.eval_prompts,
            self._judge,
            categories=self.data.eval_categories,
            max_new_tokens=c.max_new_tokens,
            batch_size=c.eval_batch_size,
            prompt_format=self.data.prompt_format,
            progress=False,
        )
        accuracy = self.data.finetune_accuracy(model)
        return result.score, accuracy, result.per_category

    def _set_bar(self, name: str, stage: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{name}: {stage}")

    def _advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def run_row(self, name: str, spec, p: float) -> dict:
        row = {"name": name, "defense": spec.name if spec else None, "stage": spec.stage if spec else None, "p": p}
        seconds = {}
        base = None
        if name == "no-alignment":
            model, seconds["align"] = self.data.load_base(), 0.0
        else:
            model, seconds["align"] = self.aligned(name, spec if spec and spec.stage == "alignment" else None)
        self._advance()
        aligned = copy.deepcopy(model) if spec is not None and spec.stage == "post-fine-tuning" else None

        self._set_bar(name, f"fine-tune p={p}")
        start = time.perf_counter()
        model = self._train(model, "fine-tuning", name, spec if spec and spec.stage == "fine-tuning" else None)
        seconds["finetune"] = time.perf_counter() - start
        self._advance()

        if spec is not None and spec.stage == "post-fine-tuning":
            self._set_bar(name, "post-fine-tuning")
            start = time.perf_counter()
            overrides = dict(spec.bench_overrides) if self.config.toy else {}
            post_config = _build_config(spec.config_class, self._train_values("fine-tuning", name), overrides)
            base = self.data.load_base()
            out = os.path.join(self.work_dir, f"{name}-post")
            model = spec.post_hoc(
                model,
                post_config,
                harmful_dataset=self.data.harmful,
                processing_class=self.data.tokenizer,
                base_model=base,
                aligned_model=aligned,
                output_dir=out,
            )
            seconds["post"] = time.perf_counter() - start
            del base, aligned

        self._set_bar(name, "evaluate")
        start = time.perf_counter()
        hs, fa, per_category = self.evaluate(model)
        seconds["eval"] = time.perf_counter() - start
        self._advance()
        row.update(harmful_score=hs, finetune_accuracy=fa, seconds={k: round(v, 2) for k, v in seconds.items()})
        row["per_category"] = per_category
        return row

    # --------------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        from tqdm.auto import tqdm

        c = self.config
        specs = self.specs()
        grid = [("sft", None), ("no-alignment", None)] + [(s.name, s) for s in specs]
        ratios = c.ratios
        total = 3 + 3 * len(grid) * len(ratios)  # calibration (base, aligned, clean) + 3 stages per row
        self._bar = tqdm(total=total, desc="trl-safety bench", disable=not c.progress, unit="stage")
        rows, errors = [], {}
        calibration_start = time.perf_counter()
        try:
            self._set_bar("base", "evaluate")
            base_hs, base_fa, _ = self.evaluate(self.data.load_base())
            self._advance()
            aligned, _ = self.aligned("sft")
            aligned_hs, aligned_fa, _ = self.evaluate(aligned)
            self._advance()
            self._set_bar("sft", "fine-tune p=0")
            self._poisoned = self.data.poisoned(0.0)
            clean = self._train(aligned, "fine-tuning", "sft-clean")
            clean_hs, clean_fa, _ = self.evaluate(clean)
            self._advance()
            del aligned, clean
            calibration_seconds = time.perf_counter() - calibration_start
            for p in ratios:
                self._poisoned = self.data.poisoned(p)
                for name, spec in grid:
                    try:
                        rows.append(self.run_row(name, spec, p))
                    except Exception as exc:  # one broken defense must not hide the others' results
                        logger.warning("Bench row %s (p=%s) failed: %s: %s", name, p, type(exc).__name__, exc)
                        logger.debug("Traceback of the failed row %s", name, exc_info=True)
                        errors[f"{name}@{p}"] = f"{type(exc).__name__}: {exc}"
                        rows.append(
                            {
                                "name": name,
                                "defense": spec.name if spec else None,
                                "stage": spec.stage if spec else None,
                                "p": p,
                                "harmful_score": None,
                                "finetune_accuracy": None,
                                "seconds": {},
                                "error": errors[f"{name}@{p}"],
                            }
                        )
                        self._bar.update(3)
        finally:
            self._bar.close()
        main = [r for r in rows if r["p"] == c.p]
        sft_row = next(r for r in main if r["name"] == "sft")
        fas = [r["finetune_accuracy"] for r in main if r["finetune_accuracy"] is not None]
        calibration = {
            "base_hs": base_hs,
            "aligned_hs": aligned_hs,
            "sft_clean_hs": clean_hs,
            "sft_hs": sft_row["harmful_score"],
            "min_fa": min(fas) if fas else None,
        }
        config = dataclasses.asdict(c)
        config.update(
            self.data.describe(),
            ratios=ratios,
            base_fa=base_fa,
            aligned_fa=aligned_fa,
            sft_clean_fa=clean_fa,
            setup_seconds=round(self.setup_seconds, 2),
            calibration_seconds=round(calibration_seconds, 2),
        )
        if not c.sweep:
            for row in rows:
                row.pop("p")
        return {"config": config, "calibration": calibration, "rows": rows, "errors": errors}


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def run_bench(config: BenchConfig) -> dict:
    """Run the bench and write `results.json` and `tradeoff.png` into `config.output_dir`."""
    import torch

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
    with open(os.path.join(config.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    results["plot"] = write_tradeoff_plot(results, os.path.join(config.output_dir, "tradeoff.png"))
    return results


def write_tradeoff_plot(results: dict, path: str) -> str | None:
    """HS (y) against FA (x), one labelled point per row. Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            "matplotlib is not installed, so %s was not written. Install it with `pip install trl-safety[plot]`.",
            path,
        )
        return None
    rows = [r for r in results["rows"] if r.get("harmful_score") is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    # rows at the same point share one label (stacked names) instead of overprinting each other
    points: dict[tuple, list[str]] = {}
    for row in rows:
        label = row["name"] if "p" not in row else f"{row['name']} (p={row['p']})"
        color = "black" if row["defense"] is None else f"C{STAGE_ORDER.get(row['stage'], 0)}"
        ax.scatter(row["finetune_accuracy"], row["harmful_score"], color=color)
        points.setdefault((row["finetune_accuracy"], row["harmful_score"]), []).append(label)
    for (x, y), labels in points.items():
        ax.annotate(
            "\n".join(", ".join(labels[i : i + 3]) for i in range(0, len(labels), 3)),
            (x, y),
            fontsize=7,
            xytext=(-4, -4),
            textcoords="offset points",
            va="top",
            ha="right",
        )
    for stage, index in STAGE_ORDER.items():
        ax.scatter([], [], color=f"C{index}", label=f"{stage} defense")
    ax.scatter([], [], color="black", label="baseline")
    ax.set_xlabel("fine-tune accuracy (%) →  better")
    ax.set_ylabel("harmful score (%) →  worse")
    p = results["config"].get("p")
    ax.set_title(f"Harmful score vs fine-tune accuracy (p={p}, n={results['config'].get('n')})")
    ax.set_ylim(-5, 105)
    low = min((r["finetune_accuracy"] for r in rows), default=0.0)
    ax.set_xlim(max(-2.0, low - 30.0), 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(results: dict) -> str:
    """The results as a fixed-width table: HS, FA and wall time per stage."""
    sweep = any("p" in r for r in results["rows"])
    header = ["name", "stage"] + (["p"] if sweep else []) + ["HS %", "FA %", "align s", "ft s", "post s", "eval s"]
    lines = []
    for r in results["rows"]:
        s = r.get("seconds", {})

        def num(v, fmt="{:.1f}"):
            return "-" if v is None else fmt.format(v)

        cells = [r["name"], r["stage"] or "baseline"] + ([str(r["p"])] if sweep else [])
        cells += [num(r.get("harmful_score")), num(r.get("finetune_accuracy"))]
        cells += [num(s.get(k)) for k in ("align", "finetune", "post", "eval")]
        if r.get("error"):
            cells[-1] += f"  ERROR: {r['error'][:80]}"
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(cells, widths)) for cells in lines]
    cal = results["calibration"]
    out.append("")
    out.append("calibration: " + ", ".join(f"{k}={'-' if v is None else round(v, 1)}" for k, v in cal.items()))
    return "\n".join(out)
