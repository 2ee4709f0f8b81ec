"""`DefenseTrainerMixin`: what every defense trainer shares on top of `trl.SFTTrainer`.

- accepts a plain `SFTConfig` (or nothing) and upgrades it to the defense's config without losing fields;
- accepts `alignment_dataset=` / `harmful_dataset=` or loads them from the config's `*_dataset_name` fields, then
  prepares them with TRL's own dataset preparation;
- accepts `base_model=` or loads it from the config's `base_model_name_or_path`, for defenses whose `extra_models`
  declare that reference-model role (AsFT's alignment direction);
- refuses backends the defense cannot run on, before training;
- refuses bad input at construction, by rules shared by every defense: another defense's config, defense fields
  out of range (`core.config`), `<role>_*` fields that cannot apply to a dataset object, `*_num_samples` larger
  than the dataset, datasets with no token that contributes to the loss, encoder-decoder models, and models whose
  decoder layers cannot be found (for defenses with `locates_layers`);
- saves defense state with every checkpoint (safetensors + JSON, `core.state_io`), restores it on resume, and
  refuses checkpoints written by another defense;
- writes `defense_config.json` beside the weights and a model card with a defense section.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, ClassVar

import torch
from datasets import Dataset, IterableDataset
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig

from .. import compat
from ..data.loading import get_dataset_adapter, load_role_dataset
from ..models import recorded_base_model
from .batches import CyclingBatches
from .card import DEFENSE_CONFIG_NAME, build_model_card, find_results, licence_notes_for
from .config import (
    DefenseConfigMixin,
    check_defense_fields,
    defense_field_names,
    object_dataset_num_samples,
    select_num_samples,
    upgrade_config,
)
from .distributed import backend_name, fsdp_version
from .layers import (
    check_decoder_only,
    get_attention_modules,
    get_decoder_layers,
    is_peft_model,
    set_layer_overrides,
)
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


def load_named_role_dataset(config, role: str, name: str):
    """Load the `<role>` dataset named `name` with the config's `<role>_dataset_config/_split/_num_samples`.

    `<role>_num_samples` larger than the dataset is refused naming the field. For a Hub id with a registered adapter
    the adapter selects the rows (its options may add an offset); otherwise the first rows are taken here.
    """
    dataset_config = getattr(config, f"{role}_dataset_config", None)
    split = getattr(config, f"{role}_dataset_split", "train")
    num_samples = getattr(config, f"{role}_num_samples", None)
    if get_dataset_adapter(name) is None:
        dataset = load_role_dataset(role, name, config=dataset_config, split=split, num_samples=None)
        return select_num_samples(dataset, role, num_samples, source=name)
    try:
        return load_role_dataset(role, name, config=dataset_config, split=split, num_samples=num_samples)
    except ValueError as exc:
        if num_samples is None:
            raise
        error = exc
    # Did `num_samples` cause it? Then say which field fixes it (the adapter's own message does not)
    try:
        full = load_role_dataset(role, name, config=dataset_config, split=split, num_samples=None)
    except Exception:
        raise error from None
    select_num_samples(full, role, num_samples, source=name)
    raise error


def _has_loss_token(labels, seq_lengths=None) -> bool:
    """Whether a prepared row has a label the causal-LM loss uses (labels are shifted: a sequence's first is not)."""
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    starts = {0}
    if seq_lengths is not None:  # packed row: every packed sequence's first token is masked by the collator
        seq_lengths = seq_lengths.tolist() if hasattr(seq_lengths, "tolist") else list(seq_lengths)
        position = 0
        for length in seq_lengths:
            starts.add(position)
            position += int(length)
    return any(label != -100 for index, label in enumerate(labels) if index not in starts)


def has_trainable_token(dataset) -> bool | None:
    """Whether some row of a prepared dataset has a token that contributes to the loss.

    Reads `labels` (built by TRL's preparation from `completion_mask` / `assistant_masks` and truncated to
    `max_length`), or `input_ids` when there are no labels (TRL's collator then trains on every token). Stops at the
    first such row, so it is cheap on real data. `None` when it cannot tell (an `IterableDataset`, or raw rows left
    for a custom collator).
    """
    if not isinstance(dataset, Dataset):
        return None
    columns = dataset.column_names
    column = "labels" if "labels" in columns else "input_ids" if "input_ids" in columns else None
    if column is None:
        return None
    packed = "seq_lengths" in columns
    selected = dataset.with_format(None).select_columns([column, "seq_lengths"] if packed else [column])
    for batch in selected.iter(batch_size=256):
        lengths = batch["seq_lengths"] if packed else [None] * len(batch[column])
        if any(_has_loss_token(labels, seq) for labels, seq in zip(batch[column], lengths)):
            return True
    return False


def check_trainable_tokens(trainer, dataset, role: str, raw=None, formatting_func=None) -> None:
    """Refuse a prepared `<role>` dataset in which no token contributes to the loss, naming the field that fixes it.

    `raw` (the dataset before preparation) lets the error say whether truncation to `max_length` is the cause: a few
    raw rows are prepared again without truncation.
    """
    if has_trainable_token(dataset) is not False:
        return
    args = trainer.args
    rows = len(dataset)
    truncation = None
    if args.max_length is not None and isinstance(raw, Dataset) and len(raw) > 0:
        probe_args = copy.copy(args)
        probe_args.max_length = None
        probe_args.shuffle_dataset = False
        probe_args.dataset_num_proc = None
        try:
            sample = raw.select(range(min(16, len(raw))))
            untruncated = compat.prepare_dataset(
                trainer, sample, probe_args, f"{role} check (trl_safety)", formatting_func
            )
            truncation = bool(has_trainable_token(untruncated))
        except Exception:  # the diagnosis is best effort; the error below stands either way
            truncation = None
    fixes = []
    if args.max_length is not None and truncation is not False:
        fixes.append(
            f"truncation to `max_length`={args.max_length} (truncation_mode={args.truncation_mode!r}) "
            + ("removes every trainable token" if truncation else "may remove every trainable token")
            + ": increase `max_length`, set `truncation_mode='keep_end'`, or shorten the prompts"
        )
    raw_columns = set(raw.column_names) if isinstance(raw, Dataset) else set()
    if truncation is not True:
        if "labels" in raw_columns:  # TRL uses a dataset's own labels as they are
            fixes.append("the dataset's own `labels` column is -100 on every token the loss uses: fix those labels")
        else:
            if compat.completion_only_loss(trainer) and raw_columns & {"completion", "completion_mask"}:
                fixes.append(
                    "`completion_only_loss` trains on completion tokens only and none is left: give non-empty "
                    "completions or set `completion_only_loss=False`"
                )
            if args.assistant_only_loss:
                fixes.append(
                    "`assistant_only_loss=True` trains on assistant tokens only: add assistant turns (and a chat "
                    "template with `{% generation %}`) or set `assistant_only_loss=False`"
                )
        column = "input_ids" if "input_ids" in dataset.column_names else "labels"
        if rows > 0 and all(len(ids) < 2 for ids in dataset.with_format(None)[:16][column]):
            fixes.append("sequences need at least 2 tokens (the first token is never a target)")
    left = "no row is left" if rows == 0 else f"all {rows} rows are fully masked"
    raise ValueError(
        f"The {role} dataset has no token that contributes to the loss after TRL's preparation ({left}): "
        f"{type(trainer).__name__} would get a zero loss from it. Possible causes and fixes: "
        + ("; ".join(fixes) or "check how its rows are masked")
        + "."
    )


def _registered_defense_of(config) -> str | None:
    # `register_defense` writes the spec onto its config class; a subclass finds its nearest registered base
    spec = getattr(type(config), "defense_spec", None)
    return spec.name if spec is not None else None


def check_config_class(trainer_class: type, config_class: type, args) -> None:
    """Refuse another defense's config: it would be upgraded silently, its fields read as this defense's."""
    if isinstance(args, config_class) or not isinstance(args, DefenseConfigMixin):
        return
    defense = _registered_defense_of(args)
    owner = f" (defense {defense!r})" if defense else " (another defense's config)"
    raise TypeError(
        f"{trainer_class.__name__} got a {type(args).__name__}{owner}; pass a {config_class.__name__} or a plain "
        "SFTConfig."
    )


class DefenseTrainerMixin:
    """Mixin placed before `SFTTrainer` in every defense trainer's bases.

    Subclasses set the mechanics attributes below (`extra_datasets`, `unsupported_backends`, …) and may override
    [`setup_defense`], [`defense_state_dict`] and [`load_defense_state_dict`]. The identity attributes
    (`defense_spec`, `defense_name`, `stage`, `config_class`, `_name`, `_paper`, `_tag_names`, `licence_notes`) are
    written by `register_defense` from the defense's `DefenseSpec`; the defaults here are plain SFT's, for a subclass
    that is not registered.
    """

    defense_spec: ClassVar[Any] = None  # the registered `DefenseSpec`
    defense_name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    config_class: ClassVar[type] = SFTConfig
    # Extra dataset roles the defense needs ("alignment", "harmful"), each loaded from `<role>_dataset=` or config
    extra_datasets: ClassVar[tuple[str, ...]] = ()
    # Extra model roles the defense needs ("base"), each given as `<role>_model=` or the config's
    # `<role>_model_name_or_path`; loaded before SFTTrainer's set-up into `self.raw_extra_models[role]`
    extra_models: ClassVar[tuple[str, ...]] = ()
    # Backends (`ddp`, `zero1`, `zero2`, `zero3`, `fsdp`) this defense refuses, with the reason shown to the user
    unsupported_backends: ClassVar[dict[str, str]] = {}
    # Why the update of GA 2 × batch B differs from GA 1 × batch 2B even when every row is the same (a norm taken
    # over the micro-batch, a draw or a state update per micro-batch); empty when splitting a step changes nothing
    # but the arithmetic. The contract tests check GA at the neutral settings for such a defense.
    split_dependence: ClassVar[str] = ""
    # FSDP2 is refused unless the defense has passed the FSDP2 matrix (tests/distributed/test_fsdp2.py, 2 CPU ranks
    # through accelerate's FSDP2 path; docs/distributed.md); FSDP1 is refused for every defense
    fsdp_verified: ClassVar[bool] = False
    # The defense looks up the decoder layers (hooks, layer selection, or the reentrant-checkpointing workaround of
    # its probe passes): they are located at construction, with the config's `layers_path` (and `attention_attr`)
    # recorded on the model for every later lookup. Its config must have a `layers_path` field.
    locates_layers: ClassVar[bool] = False
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
        base_model: Any = None,
        **kwargs,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = self.config_class(output_dir=f"{str(model_name).split('/')[-1]}-{self.defense_name}")
        elif not isinstance(args, self.config_class):
            check_config_class(type(self), self.config_class, args)
            args = upgrade_config(args, self.config_class)
        check_defense_fields(args, warn_no_effect=False)  # again: it may have been changed since it was built
        model, positional, kwargs = self._prepare_model_reference(model, args, positional, kwargs)
        if not isinstance(model, str):
            check_decoder_only(model, type(self).__name__)

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
        # As loaded, before TRL's preparation: a defense builds second views of them in `setup_defense`
        self.raw_extra_datasets: dict[str, Dataset] = raw

        given_models = {"base": base_model}
        for role, value in given_models.items():
            if value is not None and role not in self.extra_models:
                raise ValueError(
                    f"{type(self).__name__} does not use a {role} model, but `{role}_model=` was given. "
                    f"It uses: {', '.join(self.extra_models) or 'no extra model'}."
                )
        self._model_sources: dict[str, str] = {}
        self.raw_extra_models: dict[str, Any] = {
            role: self._load_extra_model(role, given_models.get(role), args) for role in self.extra_models
        }

        raw_train = positional[1] if len(positional) > 1 else kwargs.get("train_dataset")

        super().__init__(model, args, *positional, **kwargs)

        check_decoder_only(self.model, type(self).__name__)
        backend = backend_name(self.accelerator)
        refused = self.refused_backends()
        if backend in refused:
            raise NotImplementedError(
                f"{type(self).__name__} cannot run under {backend}: {refused[backend]} "
                f"Supported backends: {', '.join(self.supported_backends())}."
            )
        if backend == "fsdp" and fsdp_version(self.accelerator) != 2:
            # only FSDP2 (`fully_shard`, DTensor parameters) has been measured; FSDP1's flat parameters have not
            raise NotImplementedError(
                f"{type(self).__name__} cannot run under FSDP{fsdp_version(self.accelerator)}: only FSDP2 is "
                "supported; set `fsdp_version: 2` in the accelerate config (see docs/distributed.md)."
            )
        if self.train_dataset is not None:
            formatting_func = compat.formatting_func(self)
            check_trainable_tokens(self, self.train_dataset, "train", raw_train, formatting_func)
        for role, dataset in raw.items():
            prepared = compat.prepare_dataset(self, dataset, self.args, f"{role} (trl_safety)")
            check_trainable_tokens(self, prepared, role, dataset)
            setattr(self, f"{role}_dataset", prepared)
        if self.locates_layers:
            self._locate_layers()
        self._pending_defense_state: dict | None = None
        self.setup_defense()

    @staticmethod
    def _prepare_model_reference(model, args, positional: tuple, kwargs: dict):
        """GGUF files, model aliases (`"smollm2"`) and GGUF-loaded models, made into what TRL can train and save
        (`trl_safety.models.prepare_model`); the loaded tokenizer becomes `processing_class` unless one was given."""
        from ..models import prepare_model

        positional = list(positional)
        given = positional[3] if len(positional) > 3 else kwargs.get("processing_class")
        model, processing_class, consumed = prepare_model(model, args.model_init_kwargs, given)
        if consumed:
            # loaded here with them: TRL would otherwise warn that it ignores them
            args.model_init_kwargs = None
        if processing_class is not given:
            if len(positional) > 3:
                positional[3] = processing_class
            else:
                kwargs = {**kwargs, "processing_class": processing_class}
        return model, tuple(positional), kwargs

    # ----------------------------------------------------------------------------------------------- extension points
    def setup_defense(self) -> None:
        """Create the defense's state (samplers, snapshots, loaders). Called at the end of `__init__`, after every
        dataset was prepared and checked; `self.raw_extra_datasets[role]` holds each extra dataset as loaded."""

    def uses_attention_modules(self) -> bool:
        """Whether the defense, as configured, hooks each layer's `<attention_attr>` submodule (checked at
        construction when `locates_layers`)."""
        return False

    def _locate_layers(self) -> None:
        """Find the decoder layers (and attention modules) now, so a model the defense cannot run on is refused at
        construction with the config field that fixes it; record the overrides for every later lookup."""
        name = type(self).__name__
        if not hasattr(self.args, "layers_path"):
            raise TypeError(
                f"{name} sets `locates_layers` but {type(self.args).__name__} has no `layers_path` field; add "
                "`core.config.DecoderLayersArguments` to its bases."
            )
        set_layer_overrides(self.model, self.args.layers_path, getattr(self.args, "attention_attr", None))
        try:
            get_decoder_layers(self.model)
            if self.uses_attention_modules():
                get_attention_modules(self.model)
        except ValueError as exc:
            raise ValueError(f"{name} cannot run on this model: {exc}") from None

    def defense_state_dict(self) -> dict[str, Any]:
        """State to save with checkpoints so a resumed run continues exactly."""
        return {}

    def load_defense_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what [`defense_state_dict`] returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no defense state, but the checkpoint holds {sorted(state)}.")

    def inference_prompt_format(self, prompt_format):
        """The prompt format the trained model is served with, given the one a prompt would get (a callable, a
        template name or None): unchanged, unless the defense changes inference (BackdoorAlign's trigger)."""
        return prompt_format

    # --------------------------------------------------------------------------------------------------- helpers
    @classmethod
    def refused_backends(cls) -> dict[str, str]:
        """Backends this trainer refuses, with the reason (its own list plus FSDP until verified)."""
        refused = dict(cls.unsupported_backends)
        if not cls.fsdp_verified:
            refused.setdefault(
                "fsdp",
                "FSDP2 has not been verified for this defense (see docs/distributed.md); use DDP or DeepSpeed ZeRO.",
            )
        return refused

    @classmethod
    def supported_backends(cls) -> list[str]:
        refused = cls.refused_backends()
        return [b for b in ("single", "ddp", "zero1", "zero2", "zero3", "fsdp") if b not in refused]

    def log_metric(self, name: str, value: float | torch.Tensor, mode: str | None = None) -> None:
        """Log `<defense_name>/<name>` through SFTTrainer's metric buffer (averaged over the logging interval).

        `name` is the bare metric name: the prefix is added here, so a name containing `/` is refused
        (`docs/design/architecture.md` §14). `mode` (`"train"` / `"eval"`) defaults to the model's current mode.
        """
        if "/" in name:
            raise ValueError(
                f"{type(self).__name__}.log_metric got {name!r}: pass the bare metric name, "
                f"`log_metric` adds the {self.defense_name!r}/ prefix itself."
            )
        if not self.defense_name:
            raise TypeError(f"{type(self).__name__} has no `defense_name` to prefix its metrics with.")
        if isinstance(value, torch.Tensor):
            value = value.detach().float().item()
        mode = mode or ("train" if self.model.training else "eval")
        compat.metrics_buffer(self, mode)[f"{self.defense_name}/{name}"].append(float(value))

    def cycling_batches(self, role: str, batch_size: int | None = None) -> CyclingBatches:
        """An endless, resumable loader over the prepared `<role>` dataset."""
        return CyclingBatches(
            self,
            getattr(self, f"{role}_dataset"),
            batch_size=batch_size or compat.train_batch_size(self),
            description=role,
            seed=self.args.seed,
        )

    def _load_extra_dataset(self, role: str, dataset, args) -> Dataset:
        """Load `<role>` by name, or take the object, applying `<role>_num_samples` either way (first rows)."""
        if dataset is None:
            name = getattr(args, f"{role}_dataset_name", None)
            if name is None:
                raise ValueError(
                    f"{type(self).__name__} needs a {role} dataset: pass `{role}_dataset=` to the trainer or set "
                    f"`{role}_dataset_name` in the config (a Hub id or a local file/folder)."
                )
            dataset = load_named_role_dataset(args, role, name)
            self._dataset_sources[role] = name
        else:
            check_trl_format(dataset, role, args.dataset_text_field)
            rows = len(dataset)
            num_samples = object_dataset_num_samples(args, role, rows, type(self).__name__)
            dataset = select_num_samples(dataset, role, num_samples)
            selected = "" if num_samples is None else f", the first {num_samples} of {rows}"
            self._dataset_sources[role] = f"passed as a dataset object ({len(dataset)} rows{selected})"
        check_trl_format(dataset, role, args.dataset_text_field)
        return dataset

    def _load_extra_model(self, role: str, model, args):
        """The `<role>` model: the object given as `<role>_model=`, else loaded from `<role>_model_name_or_path` (a
        local folder, a Hub id, an alias such as `smollm2`, or an adapter folder merged onto its base). Exactly one of
        the two ways must be used."""
        field_name = f"{role}_model_name_or_path"
        name = getattr(args, field_name, None)
        who = type(self).__name__
        if model is not None and name is not None:
            raise ValueError(
                f"{who} got both `{role}_model=` and `{field_name}`={name!r}; give the {role} model one way only."
            )
        if model is None and name is None:
            raise ValueError(
                f"{who} needs a {role} model: pass `{role}_model=` to the trainer (a model, a local folder or a Hub "
                f"id) or set `{field_name}` in the config."
            )
        source = model if model is not None else name
        if isinstance(source, torch.nn.Module):
            self._model_sources[role] = "passed as a model object"
            return source
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"`{role}_model=` must be a model or a path, got {type(source).__name__}.")
        from ..defenses.safelora.safelora_project import _load_model  # the one loader of reference models
        from ..models import resolve_model_name

        how = f"`{role}_model=`" if model is not None else f"`{field_name}`"
        try:
            loaded = _load_model(resolve_model_name(str(source)), role)
        except (OSError, ValueError) as exc:  # a missing folder, an unknown Hub id, a folder without a model
            raise ValueError(f"{who} cannot load the {role} model {str(source)!r} given as {how}: {exc}") from None
        self._model_sources[role] = str(source)
        return loaded

    # --------------------------------------------------------------------------------------- checkpoints and resume
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = compat.checkpoint_folder(self, trial)
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
        is_adapter = is_peft_model(model)
        base_model = None
        if is_adapter:
            peft_config = next(iter(model.peft_config.values()))
            base_model = peft_config.base_model_name_or_path
        base_model = base_model or getattr(getattr(model, "config", None), "_name_or_path", None) or None
        base_model = recorded_base_model(base_model)  # a converted cache folder (`smollm2()`): its Hub id
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
        """Write `README.md` in the output dir: TRL's card (training procedure, framework versions, citations) with
        our quick start, the harmful-fine-tuning-defense section and a `model-index` from a report in the folder.

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
            eval_datasets=found.get("eval_datasets"),
            tracker_urls=compat.tracker_urls(),  # TRL's badges for the run's W&B / Trackio / Comet pages
        )
        card.save(os.path.join(directory, "README.md"))
