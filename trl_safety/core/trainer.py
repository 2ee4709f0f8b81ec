"""`DefenseTrainerMixin`: what every defense trainer shares on top of `trl.SFTTrainer`.

- accepts a plain `SFTConfig` (or nothing) and upgrades it to the defense's config without losing fields;
- accepts `alignment_dataset=` / `harmful_dataset=` or loads them from the config's `*_dataset_name` fields, then
  prepares them with TRL's own dataset preparation;
- refuses backends the defense cannot run on, before training;
- saves defense state with every checkpoint (safetensors + JSON, `core.state_io`), restores it on resume, and
  refuses checkpoints written by another defense;
- writes `defense_config.json` beside the weights and a model card with a defense section.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, ClassVar

import torch
from datasets import Dataset, IterableDataset
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig

from ..data.loading import load_role_dataset
from .batches import CyclingBatches
from .card import DEFENSE_CONFIG_NAME, build_model_card, find_results, licence_notes_for
from .config import defense_field_names, upgrade_config
from .distributed import backend_name
from .state_io import STATE_JSON_NAME, has_defense_state, load_defense_state, save_defense_state


logger = logging.getLogger(__name__)

_TRL_FORMAT_HINT = (
    "Expected one of TRL's dataset formats: `text`, `prompt`+`completion` (standard or conversational), "
    "`messages`, or pre-tokenized `input_ids`."
)


def check_trl_format(dataset, role: str, text_field: str = "text") -> None:
    """Fail early when a dataset is empty or has none of TRL's formats."""
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"The {role} dataset must be a map-style `datasets.Dataset`, not an IterableDataset.")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"The {role} dataset must be a `datasets.Dataset`, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError(f"The {role} dataset is empty.")
    columns = set(dataset.column_names)
    if not (
        text_field in columns or {"prompt", "completion"} <= columns or "messages" in columns or "input_ids" in columns
    ):
        raise ValueError(f"The {role} dataset has columns {sorted(columns)}. {_TRL_FORMAT_HINT}")


class DefenseTrainerMixin:
    """Mixin placed before `SFTTrainer` in every defense trainer's bases.

    Subclasses set the class attributes below and may override [`setup_defense`], [`defense_state_dict`] and
    [`load_defense_state_dict`].
    """

    defense_name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    config_class: ClassVar[type] = SFTConfig
    # Extra dataset roles the defense needs ("alignment", "harmful"), each loaded from `<role>_dataset=` or config
    extra_datasets: ClassVar[tuple[str, ...]] = ()
    # Backends (`ddp`, `zero1`, `zero2`, `zero3`, `fsdp`) this defense refuses, with the reason shown to the user
    unsupported_backends: ClassVar[dict[str, str]] = {}
    # FSDP cannot be exercised without GPUs; a defense opts in once it has been verified there
    fsdp_verified: ClassVar[bool] = False
    _name: ClassVar[str] = "SFT"
    _paper: ClassVar[dict] = {}
    _tag_names: ClassVar[list[str]] = ["trl", "sft", "trl-safety"]
    # Licence caveats shown on the model card
    licence_notes: ClassVar[list[str]] = []

    def __init__(
        self,
        model,
        args: SFTConfig | None = None,
        *positional,
        alignment_dataset: Dataset | None = None,
        harmful_dataset: Dataset | None = None,
        **kwargs,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = self.config_class(output_dir=f"{str(model_name).split('/')[-1]}-{self.defense_name}")
        elif not isinstance(args, self.config_class):
            args = upgrade_config(args, self.config_class)

        # Load the raw extra datasets before the (slow) SFTTrainer set-up, so a missing dataset fails first
        given = {"alignment": alignment_dataset, "harmful": harmful_dataset}
        for role, dataset in given.items():
            if dataset is not None and role not in self.extra_datasets:
                raise ValueError(
                    f"{type(self).__name__} does not use a {role} dataset, but `{role}_dataset=` was given. "
                    f"It uses: {', '.join(self.extra_datasets) or 'no extra dataset'}."
                )
        self._dataset_sources: dict[str, str] = {}
        raw = {role: self._load_extra_dataset(role, given[role], args) for role in self.extra_datasets}

        super().__init__(model, args, *positional, **kwargs)

        backend = backend_name(self.accelerator)
        refused = self.refused_backends()
        if backend in refused:
            raise NotImplementedError(
                f"{type(self).__name__} cannot run under {backend}: {refused[backend]} "
                f"Supported backends: {', '.join(self.supported_backends())}."
            )
        for role, dataset in raw.items():
            prepared = self._prepare_dataset(
                dataset, self.processing_class, self.args, False, None, f"{role} (trl_safety)"
            )
            if len(prepared) == 0:
                raise ValueError(f"The {role} dataset is empty after tokenization and truncation to max_length.")
            setattr(self, f"{role}_dataset", prepared)
        self._pending_defense_state: dict | None = None
        self.setup_defense()

    # ----------------------------------------------------------------------------------------------- extension points
    def setup_defense(self) -> None:
        """Create the defense's state (samplers, snapshots, loaders). Called at the end of `__init__`."""

    def defense_state_dict(self) -> dict[str, Any]:
        """State to save with checkpoints so a resumed run continues exactly."""
        return {}

    def load_defense_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what [`defense_state_dict`] returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no defense state, but the checkpoint holds {sorted(state)}.")

    # --------------------------------------------------------------------------------------------------- helpers
    @classmethod
    def refused_backends(cls) -> dict[str, str]:
        """Backends this trainer refuses, with the reason (its own list plus FSDP until verified on GPUs)."""
        refused = dict(cls.unsupported_backends)
        if not cls.fsdp_verified:
            refused.setdefault(
                "fsdp",
                "FSDP has not been verified for this defense (it needs several GPUs); use DDP or DeepSpeed ZeRO.",
            )
        return refused

    @classmethod
    def supported_backends(cls) -> list[str]:
        refused = cls.refused_backends()
        return [b for b in ("single", "ddp", "zero1", "zero2", "zero3", "fsdp") if b not in refused]

    def log_metric(self, name: str, value: float | torch.Tensor) -> None:
        """Log a defense metric through SFTTrainer's metric buffer (averaged over the logging interval)."""
        if isinstance(value, torch.Tensor):
            value = value.detach().float().item()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(float(value))

    def cycling_batches(self, role: str, batch_size: int | None = None) -> CyclingBatches:
        """An endless, resumable loader over the prepared `<role>` dataset."""
        return CyclingBatches(
            self,
            getattr(self, f"{role}_dataset"),
            batch_size=batch_size or self._train_batch_size,
            description=role,
            seed=self.args.seed,
        )

    def _load_extra_dataset(self, role: str, dataset, args) -> Dataset:
        if dataset is None:
            name = getattr(args, f"{role}_dataset_name", None)
            if name is None:
                raise ValueError(
                    f"{type(self).__name__} needs a {role} dataset: pass `{role}_dataset=` to the trainer or set "
                    f"`{role}_dataset_name` in the config (a Hub id or a local file/folder)."
                )
            dataset = load_role_dataset(
                role,
                name,
                config=getattr(args, f"{role}_dataset_config", None),
                split=getattr(args, f"{role}_dataset_split", "train"),
                num_samples=getattr(args, f"{role}_num_samples", None),
            )
            self._dataset_sources[role] = name
        else:
            self._dataset_sources[role] = f"passed as a dataset object ({len(dataset)} rows)"
        check_trl_format(dataset, role, args.dataset_text_field)
        return dataset

    # --------------------------------------------------------------------------------------- checkpoints and resume
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.is_world_process_zero():
            save_defense_state(folder, self.defense_name, self.defense_state_dict())

    def load_defense_checkpoint(self, checkpoint: str) -> None:
        """Restore the defense state of a checkpoint folder (refusing other defenses' checkpoints; no pickle)."""
        if not has_defense_state(checkpoint):
            if self.defense_state_dict():
                raise ValueError(
                    f"Checkpoint {checkpoint} has no {STATE_JSON_NAME}: it was not written by "
                    f"{type(self).__name__}, whose state (e.g. {sorted(self.defense_state_dict())}) cannot be "
                    "restored. Resume from a checkpoint of the same defense, or start a new run."
                )
            logger.warning("Checkpoint %s has no %s; resuming without defense state.", checkpoint, STATE_JSON_NAME)
            return
        defense, state = load_defense_state(checkpoint)
        if defense != self.defense_name:
            raise ValueError(
                f"Checkpoint {checkpoint} was written by defense {defense!r}, not "
                f"{self.defense_name!r}; refusing to resume {type(self).__name__} from it."
            )
        self.load_defense_state_dict(state)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self.load_defense_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------------------------------ saving and cards
    def defense_info(self) -> dict[str, Any]:
        """Content of `defense_config.json`: what protects the saved model."""
        hyperparameters = {}
        for name in defense_field_names(self.config_class):
            value = getattr(self.args, name)
            hyperparameters[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
        model = self.model
        is_adapter = hasattr(model, "peft_config")
        base_model = None
        if is_adapter:
            peft_config = next(iter(model.peft_config.values()))
            base_model = peft_config.base_model_name_or_path
        base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
        datasets = {f"{role} dataset": source for role, source in self._dataset_sources.items()}
        return {
            "defense": self.defense_name,
            "title": self._name,
            "stage": self.stage,
            "trainer": type(self).__name__,
            "hyperparameters": hyperparameters,
            "datasets": datasets,
            "paper": dict(self._paper),
            "base_model": base_model,
            "is_adapter": is_adapter,
            "licence_notes": list(self.licence_notes),
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the weights (or adapter) with `defense_config.json`; a user's own save also writes the model card."""
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        if not self.is_world_process_zero():
            return
        os.makedirs(output_dir, exist_ok=True)
        self._write_defense_config(output_dir)
        if not _internal_call:  # checkpoints and `push_to_hub` write their card themselves
            self._write_model_card(output_dir)

    def _write_defense_config(self, directory: str) -> None:
        with open(os.path.join(directory, DEFENSE_CONFIG_NAME), "w") as f:
            json.dump(self.defense_info(), f, indent=2, sort_keys=True, default=str)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        results: dict | None = None,
        **kwargs,
    ):
        """Write `README.md` in the output dir: TRL's card content plus the harmful-fine-tuning-defense section.

        Called by `save_model` checkpoints and by `push_to_hub(**kwargs)`, which forwards its extra keywords here.

        Args:
            model_name: name shown in the title (defaults to the output dir's name).
            dataset_name: training dataset id.
            tags: extra tags.
            results: metrics to show, `{name: value}`; defaults to the results files found in the output dir
                (`eval_report.json`, a bench `results.json`, `eval_results.json`).
        """
        if not self.is_world_process_zero():
            return
        if kwargs:
            logger.warning("create_model_card ignores the unsupported argument(s): %s.", ", ".join(sorted(kwargs)))
        self._write_model_card(self.args.output_dir, model_name, dataset_name, tags, results)
        # The card links to defense_config.json: keep it beside the card even when no `save_model` ran yet, as for
        # the per-checkpoint pushes of `push_to_hub=True`, which upload the output dir after this call
        self._write_defense_config(self.args.output_dir)

    def _write_model_card(self, directory, model_name=None, dataset_name=None, tags=None, results=None) -> None:
        if isinstance(tags, str):
            tags = [tags]
        tags = sorted({*(tags or []), *self._tag_names})
        found = {} if results is not None else find_results(directory, self.defense_name)
        card = build_model_card(
            self.defense_info(),
            model_name=model_name or os.path.basename(os.path.normpath(directory)),
            hub_model_id=self.hub_model_id if getattr(self, "hub_model_id", None) else None,
            dataset_name=dataset_name,
            tags=tags,
            results=results if results is not None else found.get("metrics"),
            results_source=found.get("source"),
            judge=found.get("judge"),
            licence_notes=licence_notes_for(found.get("mentions", [])),
        )
        card.save(os.path.join(directory, "README.md"))
