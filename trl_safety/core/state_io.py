"""Defense state in checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder is handed around like a model, so reading it must not be able to run code. A defense's state is
a nest of dicts and lists holding tensors (anchors, ε, RNG states) and JSON scalars (counters, phases); saving splits
it into `defense_state.safetensors` (the tensors, keyed by their path in the nest) and `defense_state.json` (the
nest, with `{"__tensor__": key}` where a tensor was). Loading reverses it with a plain JSON parser and safetensors,
neither of which executes anything.

Checkpoints of this project written before this format hold `defense_state.pt` (a `torch.save` pickle of the same
kind of nest). They are read with `torch.load(weights_only=True)`, PyTorch's restricted unpickler that builds only
tensors and plain containers; anything else in the file is refused, never constructed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


STATE_JSON_NAME = "defense_state.json"
STATE_TENSORS_NAME = "defense_state.safetensors"
LEGACY_STATE_NAME = "defense_state.pt"
FORMAT_VERSION = 2
_TENSOR_KEY = "__tensor__"


class DefenseStateError(ValueError):
    """A checkpoint's defense state cannot be read safely (corrupt, truncated, or not of this project's format)."""


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        # A fresh contiguous copy: safetensors refuses tensors that share storage
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR_KEY: path}
    if isinstance(value, dict):
        encoded = {}
        for key, item in value.items():
            if not isinstance(key, str) or key == _TENSOR_KEY:
                raise TypeError(
                    f"Defense state key {key!r} at {path or '<root>'} must be a string other than {_TENSOR_KEY!r}."
                )
            encoded[key] = _encode(item, f"{path}/{key}" if path else key, tensors)
        return encoded
    if isinstance(value, (list, tuple)):
        return [_encode(item, f"{path}/{index}", tensors) for index, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"Defense state at {path or '<root>'} is a {type(value).__name__}; only tensors, dicts, lists and JSON "
        "scalars can be saved."
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor], source: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_KEY}:
            key = value[_TENSOR_KEY]
            if key not in tensors:
                raise DefenseStateError(
                    f"{source} refers to tensor {key!r}, which is missing from {STATE_TENSORS_NAME}."
                )
            return tensors[key]
        return {key: _decode(item, tensors, source) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item, tensors, source) for item in value]
    return value


def save_defense_state(folder: str, defense: str, state: dict[str, Any]) -> None:
    """Write `state` of defense `defense` into `folder` as JSON + safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    payload = {"defense": defense, "format": FORMAT_VERSION, "state": _encode(state, "", tensors)}
    save_file(tensors, os.path.join(folder, STATE_TENSORS_NAME))
    # The JSON goes last: its presence marks a complete state
    with open(os.path.join(folder, STATE_JSON_NAME), "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, allow_nan=True)


def has_defense_state(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in (STATE_JSON_NAME, LEGACY_STATE_NAME))


def load_defense_state(folder: str) -> tuple[str | None, dict[str, Any]]:
    """Read the defense state of a checkpoint folder: `(defense name, state)`.

    Raises:
        DefenseStateError: naming the file, when it is corrupt or truncated, or (old format) holds anything but
            tensors and plain containers.
        FileNotFoundError: when the folder has no defense state.
    """
    json_path = os.path.join(folder, STATE_JSON_NAME)
    if os.path.exists(json_path):
        return _load_current(folder, json_path)
    legacy_path = os.path.join(folder, LEGACY_STATE_NAME)
    if os.path.exists(legacy_path):
        return _load_legacy(legacy_path)
    raise FileNotFoundError(f"{folder} has no {STATE_JSON_NAME}.")


def _load_current(folder: str, json_path: str) -> tuple[str | None, dict[str, Any]]:
    try:
        with open(json_path) as f:
            payload = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DefenseStateError(f"{json_path} is not valid JSON ({exc}); the checkpoint is corrupt.") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
        raise DefenseStateError(f"{json_path} is not a trl_safety defense state (no `state` object).")
    if payload.get("format") != FORMAT_VERSION:
        raise DefenseStateError(
            f"{json_path} has format {payload.get('format')!r}; this version of trl_safety reads format "
            f"{FORMAT_VERSION}."
        )
    tensors_path = os.path.join(folder, STATE_TENSORS_NAME)
    try:
        tensors = load_file(tensors_path)
    except (OSError, SafetensorError) as exc:
        raise DefenseStateError(f"{tensors_path} cannot be read ({exc}); the checkpoint is corrupt.") from exc
    return payload.get("defense"), _decode(payload["state"], tensors, json_path)


def _load_legacy(path: str) -> tuple[str | None, dict[str, Any]]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler raises UnpicklingError, a truncated zip RuntimeError, …
        raise DefenseStateError(
            f"{path} cannot be read safely: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Only tensors and plain containers are loaded from this old-format file (nothing in it is executed); "
            "resume from a checkpoint written by this trl_safety version, or start a new run."
        ) from exc
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise DefenseStateError(f"{path} is not a trl_safety defense state (no `state` dict).")
    return saved.get("defense"), saved["state"]
