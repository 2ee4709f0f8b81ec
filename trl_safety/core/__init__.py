"""Mechanics shared by the defenses: layer lookup, hooks, snapshots, probe losses, the trainer mixin."""

from .batches import CyclingBatches, EpochPermutationSampler
from .config import (
    AlignmentDataArguments,
    DecoderLayersArguments,
    DefenseConfigMixin,
    EffectiveIf,
    HarmfulDataArguments,
    Range,
    check_range,
    defense_field_names,
    upgrade_config,
)
from .distributed import backend_name, deepspeed_zero_stage, gathered
from .hooks import add_to_outputs, capture_outputs, first_tensor, gradient_checkpointing_disabled, replace_first
from .layers import find_modules, get_attention_modules, get_decoder_layers, unwrap_model
from .losses import is_packed_batch, lm_forward, lm_loss, per_sample_nll, per_sample_token_mean_nll
from .snapshot import ParameterSnapshot, trainable_parameters
from .state_io import DefenseStateError, load_defense_state, save_defense_state
from .trainer import DefenseTrainerMixin, check_trl_format
from .views import RowAlignedCollator, RowAlignedView, add_row_ids


__all__ = [
    "AlignmentDataArguments",
    "DecoderLayersArguments",
    "DefenseConfigMixin",
    "EffectiveIf",
    "Range",
    "RowAlignedCollator",
    "RowAlignedView",
    "CyclingBatches",
    "DefenseStateError",
    "DefenseTrainerMixin",
    "EpochPermutationSampler",
    "HarmfulDataArguments",
    "ParameterSnapshot",
    "add_row_ids",
    "add_to_outputs",
    "backend_name",
    "capture_outputs",
    "check_range",
    "check_trl_format",
    "deepspeed_zero_stage",
    "defense_field_names",
    "find_modules",
    "first_tensor",
    "gathered",
    "get_attention_modules",
    "get_decoder_layers",
    "gradient_checkpointing_disabled",
    "is_packed_batch",
    "lm_forward",
    "lm_loss",
    "load_defense_state",
    "per_sample_nll",
    "per_sample_token_mean_nll",
    "replace_first",
    "save_defense_state",
    "trainable_parameters",
    "unwrap_model",
    "upgrade_config",
]
