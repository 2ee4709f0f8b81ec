"""Settings of a bench run: the fields both modes use, the toy world's, and the real-model mode's.

`BenchConfig` is flat (one `--flag` per field in `trl-safety bench`, one key per field in `results.json`'s `config`);
its groups are its base classes. Defaults are the toy world's; `real_defaults()` gives the real-model mode's, the
evaluation part read from the canonical protocol in `trl_safety.eval.protocols`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


BASELINES = ("sft", "no-alignment")
STAGE_ORDER = {"alignment": 0, "fine-tuning": 1, "post-fine-tuning": 2}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class BenchRunArguments:
    """The grid, the data sizes, training, LoRA and evaluation: used in both modes."""

    defenses: list[str] | None = field(
        default=None,
        metadata=_help(
            "Defenses to run (registry names, space- or comma-separated); default: every registered defense. "
            "The sft and no-alignment baselines always run."
        ),
    )
    p: float = field(default=0.1, metadata=_help("Harmful ratio of the poisoned fine-tuning data."))
    sweep: list[float] | None = field(
        default=None,
        metadata=_help(
            "Several harmful ratios to run (the --p value is always included), e.g. --sweep 0 0.05 0.1 0.2."
        ),
    )
    n: int = field(default=1000, metadata=_help("Number of fine-tuning samples."))
    seed: int = field(
        default=0, metadata=_help("First seed of the run (attack sample, data order, adapter init); see --num_seeds.")
    )
    num_seeds: int = field(
        default=3, metadata=_help("Seeds per row: --seed, --seed+1, ...; rows report their mean and std.")
    )
    seeds: list[int] | None = field(
        default=None, metadata=_help("Explicit seeds of every row (overrides --seed / --num_seeds).")
    )
    calibration_ratios: list[float] | None = field(
        default_factory=lambda: [0.0, 0.02, 0.05, 0.1, 0.2],
        metadata=_help(
            "Harmful ratios of the SFT calibration sweep (calibration.sft_hs_by_p); ratios of the grid are reused. "
            "Toy mode only; none: only p=0 and the run's ratios."
        ),
    )
    curve_points: int = field(
        default=4, metadata=_help("Harmful-score evaluations during fine-tuning for each row's curve (plus step 0).")
    )
    output_dir: str = field(default="bench-out", metadata=_help("Folder for results.json and tradeoff.png."))
    progress: bool = field(default=True, metadata=_help("Show a progress bar over the stages."))
    num_alignment: int = field(
        default=400,
        metadata=_help("Harmful → refusal alignment rows (toy: plus as many benign → helpful and task rows)."),
    )
    num_harmful: int = field(
        default=400,
        metadata=_help("Harmful → compliance rows handed to defenses (disjoint from the attack rows)."),
    )
    num_eval_prompts: int = field(default=200, metadata=_help("Held-out harmful prompts of the harmful score."))
    num_task_test: int = field(default=200, metadata=_help("Task test samples of the fine-tune accuracy."))
    # training
    # toy: 600 steps make the refusal deep enough that the attack's dose matters (60 flip at p = 0.005;
    # docs/toy_world.md)
    align_steps: int | None = field(default=600, metadata=_help("Alignment steps; 0/none: use --align_epochs."))
    align_epochs: float = field(default=1.0, metadata=_help("Alignment epochs, used when --align_steps is none."))
    align_lr: float = field(default=1e-3, metadata=_help("Alignment learning rate."))
    align_batch_size: int = field(default=32, metadata=_help("Alignment batch size per device."))
    finetune_steps: int | None = field(
        default=120, metadata=_help("Fine-tuning steps (--steps); 0/none: use --finetune_epochs.")
    )
    finetune_epochs: float = field(
        default=1.0, metadata=_help("Fine-tuning epochs, used when --finetune_steps is none.")
    )
    # toy: at 5e-4, 120 LoRA steps teach the task's negated reviews and the harmful score grades with p; 60 steps
    # learn the task on some seeds only (docs/toy_world.md)
    finetune_lr: float = field(default=5e-4, metadata=_help("Fine-tuning learning rate (--lr)."))
    finetune_batch_size: int = field(default=32, metadata=_help("Fine-tuning batch size per device."))
    max_length: int = field(default=64, metadata=_help("Maximum tokenized length of a training row."))
    lr_scheduler_type: str = field(default="constant", metadata=_help("Learning-rate schedule of both stages."))
    weight_decay: float = field(default=0.0, metadata=_help("Weight decay of both stages."))
    bf16: bool = field(default=False, metadata=_help("Train in bf16."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Use gradient checkpointing."))
    use_cpu: bool = field(default=True, metadata=_help("Train on the CPU even when a GPU is present."))
    # LoRA: rank 0 means full fine-tuning
    align_lora_r: int = field(default=0, metadata=_help("LoRA rank of the alignment adapter (0: full fine-tuning)."))
    lora_r: int = field(default=8, metadata=_help("LoRA rank of the fine-tuning adapter (0: full fine-tuning)."))
    lora_alpha: float = field(default=16, metadata=_help("LoRA alpha of both adapters."))
    lora_dropout: float = field(default=0.0, metadata=_help("LoRA dropout of both adapters."))
    lora_target_modules: list[str] | str = field(
        default="all-linear", metadata=_help("LoRA target modules (names, or all-linear).")
    )
    lora_mode: str = field(
        default="double",
        metadata=_help("double: merge the alignment adapter and train a fresh one; single: keep training it."),
    )
    # evaluation
    judge: str = field(
        default="keyword",
        metadata=_help(
            "Harmful-score judge: keyword, beaver-dam, or a classifier path (see trl_safety.eval.load_judge)."
        ),
    )
    max_new_tokens: int = field(default=8, metadata=_help("New tokens per answer to a harmful prompt."))
    task_max_new_tokens: int = field(default=3, metadata=_help("New tokens per answer to a task test prompt."))
    eval_batch_size: int = field(default=100, metadata=_help("Generation batch size of the evaluation."))
    # torch intra-op threads (toy default 1: its matrices are too small to gain from more, and with other processes on
    # the cores OpenMP's spinning threads make 2 threads ~10x slower than 1); None leaves torch's setting
    num_threads: int | None = field(
        default=1, metadata=_help("torch intra-op threads during the run; 0/none: leave torch's setting.")
    )


@dataclass
class ToyWorldArguments:
    """The embedded toy world (the default mode)."""

    world_seed: int = field(
        default=0, metadata=_help("Seed of the toy world (its splits; the base model is cached per world seed).")
    )
    cache_dir: str | None = field(
        default=None,
        metadata=_help("Toy base-model cache (default $TRL_SAFETY_TOY_CACHE or ~/.cache/trl_safety/toy)."),
    )
    # None: the recipe's default; another value is cached separately
    base_pretrain_steps: int | None = field(
        default=None, metadata=_help("Pretraining steps of the toy base model (default: the recipe's).")
    )


@dataclass
class RealModelArguments:
    """Real-model mode: set by `model`; the data are the papers', loaded by id (or from local copies) at run time."""

    model: str | None = field(
        default=None,
        metadata=_help(
            "A Hub id or local path of a real causal LM: switches to real-model mode with the canonical protocol's "
            "defaults (docs/design/algorithms.md §6.5), each overridable by its flag."
        ),
    )
    alignment_dataset: str | None = field(
        default=None, metadata=_help("Real mode: the paired-refusal file (Hub id or local path).")
    )
    alignment_dataset_config: str | None = field(
        default=None, metadata=_help("Real mode: adapter options of the alignment data (key=value,...).")
    )
    harmful_dataset: str | None = field(
        default=None, metadata=_help("Real mode: BeaverTails (Hub id or local path) for the attack rows.")
    )
    harmful_dataset_config: str | None = field(
        default=None, metadata=_help("Real mode: adapter options of the attack data (key=value,...).")
    )
    eval_dataset: str | None = field(
        default=None,
        metadata=_help("Real mode: source of the harmful-score prompts (default: the harmful dataset's 30k_test)."),
    )
    task: str | None = field(default=None, metadata=_help("Real mode: user task (sst2, agnews, gsm8k)."))
    task_dataset: str | None = field(default=None, metadata=_help("Real mode: local copy of the task dataset."))
    template: str | None = field(
        default=None,
        metadata=_help("Real mode: prompt template of the data and of generation (alpaca, alpaca_newline, chat)."),
    )
    torch_dtype: str | None = field(
        default=None, metadata=_help("Real mode: dtype the model is loaded in (e.g. bfloat16).")
    )
    data: str | None = field(
        default=None,
        metadata=_help(
            "Data of a real-model run: papers (the protocol's datasets) or toy (the toy world's rows rendered by the "
            "model's chat template, judged by the toy judge; CPU-scale defaults). Default: toy for "
            "--model_name_or_path smollm2, else papers."
        ),
    )


@dataclass
class BenchConfig(RealModelArguments, ToyWorldArguments, BenchRunArguments):
    """Settings of a bench run. Toy-world defaults; `model` switches to real-model mode (see `real_defaults`)."""

    @property
    def toy(self) -> bool:
        """The toy base model (no `model`)."""
        return self.model is None

    @property
    def toy_data(self) -> bool:
        """The toy world's data: the toy model, or a real model with `data="toy"` (the default for `smollm2`)."""
        return self.model is None or resolve_data(self.model, self.data) == "toy"

    @property
    def ratios(self) -> list[float]:
        return sorted({*(self.sweep or []), self.p})

    @property
    def seed_list(self) -> list[int]:
        """The seeds every row runs with."""
        if self.seeds:
            return list(self.seeds)
        if self.num_seeds < 1:
            raise ValueError(f"num_seeds must be at least 1, got {self.num_seeds}.")
        return [self.seed + i for i in range(self.num_seeds)]


# The canonical protocol's training setting (docs/design/algorithms.md §6.5, Booster's); its evaluation part comes
# from `trl_safety.eval.protocols` in `real_defaults`
REAL_MODEL_TRAINING = dict(
    model="meta-llama/Llama-2-7b-hf",
    alignment_dataset="anonymous4486/repnoise_beavertail",
    harmful_dataset="PKU-Alignment/BeaverTails",
    num_alignment=5000,
    num_harmful=5000,
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
    task_max_new_tokens=16,
    num_threads=None,
    eval_batch_size=16,
    task="sst2",
)


# Toy-world data through a real model on CPU (`data="toy"`; benchmarks/README.md, "The bench on a real pretrained
# model"): sizes and steps that make a row take about two minutes for SmolLM2-135M on 2 cores; the rest (LoRA
# all-linear, double mode, learning rates, the keyword judge) stays the toy world's
REAL_MODEL_TOY_DATA = dict(
    n=32,
    num_alignment=16,
    num_harmful=16,
    num_eval_prompts=16,
    num_task_test=16,
    align_steps=24,  # 8 do not teach the refusal (benchmarks/README.md)
    finetune_steps=20,  # above Lisa's toy alignment_steps=10, so Lisa trains on the user's data too
    align_batch_size=4,
    finetune_batch_size=4,
    align_lora_r=8,
    max_length=96,  # the chat template's default system prompt takes ~30 of them
    eval_batch_size=16,
    num_seeds=1,
    curve_points=1,
    calibration_ratios=None,
    num_threads=None,
)
DATA_CHOICES = ("toy", "papers")


def resolve_data(model: str | None, data: str | None) -> str:
    """`data` of a run: given, or toy for the toy model and the `smollm2` alias, papers for any other model."""
    if data is not None:
        return data
    from ..models import SMOLLM2_ALIAS

    return "toy" if model is None or model == SMOLLM2_ALIAS else "papers"


def real_defaults(protocol: str = "canonical") -> dict:
    """The real-model mode's defaults: the canonical training setting plus the protocol's evaluation settings."""
    from ..eval.protocols import get_protocol

    preset = get_protocol(protocol)
    values = copy.deepcopy(REAL_MODEL_TRAINING)  # its lists must not be shared between configs
    values.update(
        judge=preset.judge,
        max_new_tokens=preset.max_new_tokens,
        num_eval_prompts=preset.num_prompts,
        num_task_test=preset.task_test_sets[values["task"]][1],
        template=preset.template,
    )
    return values
