"""`HarmfulScoreCallback`: the harmful score of a fixed prompt set, measured every N steps of any training run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from datasets import Dataset
from transformers import Trainer, TrainerCallback

from ..core.distributed import deepspeed_zero_stage
from ..eval import evaluation
from ..eval.judges import Judge, load_judge
from .logging_utils import log_metrics


logger = logging.getLogger(__name__)


class HarmfulScoreCallback(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that generates greedy answers to a fixed set of harmful prompts every
    `every_n_steps` optimizer steps, judges them, and logs `harmful_score` (percent flagged), so safety drifting
    during fine-tuning shows up next to the loss in W&B / TensorBoard / Trackio.

    Usage:
    ```python
    >>> trainer = SFTTrainer(...)
    >>> trainer.add_callback(HarmfulScoreCallback(prompts, trainer=trainer, every_n_steps=50, prompt_format="alpaca"))
    ```

    Args:
        prompts (`Sequence[str]` or `Dataset`):
            Harmful prompts, bare (the template is applied with `prompt_format`), or a dataset with a `prompt` column
            (and optionally `category`, for `harmful_score/<category>` values).
        judge (`Judge` or `str`, defaults to `"keyword"`):
            A [`~trl_safety.eval.Judge`] or a name for [`~trl_safety.eval.load_judge`]. A model judge is loaded on
            the first evaluation, on the main process only.
        every_n_steps (`int`, defaults to `100`):
            Evaluate when `global_step` is a multiple of this.
        trainer (`Trainer`, *optional*):
            The trainer, so values go through its `log` to every `report_to` integration, the console and
            `state.log_history`. Without it they are only appended to `state.log_history` and the Python logger.
        max_new_tokens (`int`, defaults to `64`), batch_size (`int`, defaults to `8`):
            Generation settings (greedy decoding).
        prompt_format (`str` or `Callable[[str], str]`, *optional*):
            Template applied to each prompt: `"alpaca"`, `"alpaca_newline"`, `"chat"`, or a function. Use the
            training template.
        eval_on_start (`bool`, defaults to `False`):
            Also evaluate before the first step (step 0), as the curve's reference point.
        metric_name (`str`, defaults to `"harmful_score"`):
            Name of the logged value.

    Generation runs on the world main process only, while the other ranks wait at their next collective; ZeRO-3
    shards the weights across ranks, so it is refused there. `history` keeps `(step, score)` pairs.
    """

    def __init__(
        self,
        prompts: Sequence[str] | Dataset,
        judge: Judge | str = "keyword",
        *,
        every_n_steps: int = 100,
        trainer: Trainer | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        prompt_format: str | Callable[[str], str] | None = None,
        eval_on_start: bool = False,
        metric_name: str = "harmful_score",
        tokenizer=None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if isinstance(prompts, Dataset):
            if "prompt" not in prompts.column_names:
                raise ValueError(f"The prompt dataset needs a `prompt` column; it has {prompts.column_names}.")
            self.categories = list(prompts["category"]) if "category" in prompts.column_names else None
            prompts = prompts["prompt"]
        else:
            self.categories = None
        self.prompts = [str(p) for p in prompts]
        if not self.prompts:
            raise ValueError("HarmfulScoreCallback needs at least one prompt.")
        self._judge_spec = judge
        self._judge: Judge | None = judge if isinstance(judge, Judge) else None
        self.every_n_steps = every_n_steps
        self.trainer = trainer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.prompt_format = prompt_format
        self.eval_on_start = eval_on_start
        self.metric_name = metric_name
        self.tokenizer = tokenizer
        self.history: list[tuple[int, float]] = []
        self._last_step = -1

    @property
    def judge(self) -> Judge:
        if self._judge is None:
            self._judge = load_judge(self._judge_spec)
        return self._judge

    def on_train_begin(self, args, state, control, **kwargs):
        accelerator = getattr(self.trainer, "accelerator", None)
        if deepspeed_zero_stage(accelerator) == 3:
            raise ValueError(
                "HarmfulScoreCallback generates on the main process only, which ZeRO-3 (sharded weights) does not "
                "support. Use DDP, ZeRO-1/2, or evaluate the saved model with `trl-safety eval` after training."
            )
        if self.eval_on_start and state.global_step == 0:
            self._evaluate(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0 and state.global_step != self._last_step:
            self._evaluate(args, state, control, **kwargs)

    def _evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._last_step = state.global_step
        if not state.is_world_process_zero:
            return
        if self.trainer is not None:
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        tokenizer = self.tokenizer or processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap their tokenizer
        if model is None or tokenizer is None:
            raise ValueError("HarmfulScoreCallback needs the model and a tokenizer (pass `tokenizer=`).")
        result = evaluation.evaluate_model(
            model,
            tokenizer,
            harmful_prompts=self.prompts,
            judge=self.judge,
            categories=self.categories,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            prompt_format=self.prompt_format,
            progress=False,
        )
        self.history.append((state.global_step, result.harmful_score))
        log_metrics(self.trainer, state, control, result.harmful_metrics(self.metric_name))
        logger.info("Harmful score at step %d: %.2f%%", state.global_step, result.harmful_score)
