"""Structural lookup of decoder layers, attention modules and target linears on any HF causal LM.

Nothing here matches class names: layers are found through `get_decoder().layers` (or the `base_model_prefix`
backbone), attention through an attribute name (`self_attn` by default), and other modules through a PEFT-style
`target_modules` pattern. Every function accepts the bare model, a `PeftModel`, or a DDP/DeepSpeed wrapper.

A defense trainer records its config's `layers_path` / `attention_attr` on the model at construction
([`set_layer_overrides`]), so every later lookup on that model (probe passes, checkpointing workarounds, callbacks)
uses the same override without each caller passing it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from torch import nn


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a PEFT adapter model. Not `hasattr(model, "peft_config")`: under peft 0.18 a model returned
    by `merge_and_unload()` keeps a stale `peft_config` attribute, with no adapter and nothing trainable."""
    return isinstance(model, PeftModel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip distributed wrappers (DDP, DeepSpeedEngine, torch.compile) and PEFT's wrappers down to the HF model."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "DataParallel") and hasattr(
            model, "module"
        ):
            model = model.module
        elif isinstance(model, PeftModel):
            model = model.get_base_model()
        elif isinstance(model, BaseTuner):  # LoraModel and friends wrap the model as `.model`
            model = model.model
    return model


_LAYERS_PATH = "_trl_safety_layers_path"
_ATTENTION_ATTR = "_trl_safety_attention_attr"
DEFAULT_ATTENTION_ATTR = "self_attn"


def set_layer_overrides(model: nn.Module, layers_path: str | None = None, attention_attr: str | None = None) -> None:
    """Record the layer-list path and attention attribute to use for every later lookup on `model`.

    `None` clears an override (back to the structural lookup and `self_attn`).
    """
    base = unwrap_model(model)
    for attribute, value in ((_LAYERS_PATH, layers_path), (_ATTENTION_ATTR, attention_attr)):
        if value is None:
            base.__dict__.pop(attribute, None)
        else:
            base.__dict__[attribute] = value


def check_decoder_only(model: nn.Module, who: str) -> None:
    """Refuse encoder-decoder models (`config.is_encoder_decoder`): the defenses run on decoder-only causal LMs."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{who} got an encoder-decoder model ({type(base).__name__}); only decoder-only causal LMs "
            "(`AutoModelForCausalLM`: Llama, Qwen2, Mistral, GPT-2, ...) are supported."
        )


def _resolve_path(root: nn.Module, path: str) -> object:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(part)
        obj = getattr(obj, part)
    return obj


def get_decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """Return the list of decoder layers of a causal LM.

    Args:
        model: the model, possibly wrapped by PEFT or a distributed engine.
        layers_path: optional dotted path from the unwrapped model to the layer list (e.g. `"transformer.h"`),
            for custom models whose layers cannot be found structurally. Defaults to the path recorded on the model
            by [`set_layer_overrides`], if any.
    """
    base = unwrap_model(model)
    if layers_path is None:
        layers_path = base.__dict__.get(_LAYERS_PATH)
    if layers_path is not None:
        try:
            layers = _resolve_path(base, layers_path)
        except AttributeError as exc:
            raise ValueError(
                f"`layers_path={layers_path!r}` does not resolve on {type(base).__name__} (missing attribute {exc})."
            ) from None
        if not isinstance(layers, (nn.ModuleList, Sequence)) or len(layers) == 0:
            raise ValueError(f"`layers_path={layers_path!r}` on {type(base).__name__} is not a non-empty module list.")
        return layers

    candidates = []
    if hasattr(base, "get_decoder"):
        try:
            candidates.append(base.get_decoder())
        except (AttributeError, NotImplementedError, TypeError):
            pass
    prefix = getattr(base, "base_model_prefix", None)
    if prefix and isinstance(getattr(base, prefix, None), nn.Module):
        candidates.append(getattr(base, prefix))
    candidates.append(base)
    for candidate in candidates:
        # Vision-language wrappers expose the text decoder one level further down
        for holder in (candidate, getattr(candidate, "language_model", None)):
            layers = getattr(holder, "layers", None) if holder is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise ValueError(
        f"Could not locate the decoder layers of {type(base).__name__}: neither `get_decoder().layers` nor "
        f"`{prefix}.layers` is a module list. Pass the dotted path to the layer list explicitly "
        "(the defense config's `layers_path`, e.g. `layers_path='transformer.h'`)."
    )


def get_attention_modules(
    model: nn.Module, attention_attr: str | None = None, layers_path: str | None = None
) -> list[nn.Module]:
    """Return the attention module of every decoder layer (`layer.<attention_attr>`).

    `attention_attr` defaults to the one recorded on the model by [`set_layer_overrides`], else `"self_attn"`.
    """
    if attention_attr is None:
        attention_attr = unwrap_model(model).__dict__.get(_ATTENTION_ATTR, DEFAULT_ATTENTION_ATTR)
    layers = get_decoder_layers(model, layers_path)
    modules = []
    for index, layer in enumerate(layers):
        module = getattr(layer, attention_attr, None)
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"Decoder layer {index} of {type(unwrap_model(model)).__name__} ({type(layer).__name__}) has no "
                f"attention submodule `{attention_attr}`. Set the defense config's `attention_attr` to the name "
                "of the attention submodule, or give `target_modules` explicitly."
            )
        modules.append(module)
    return modules


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in target_modules)


def find_modules(
    model: nn.Module, target_modules: str | Sequence[str], module_type: type | tuple[type, ...] | None = None
) -> list[tuple[str, nn.Module]]:
    """Find modules by a PEFT-style pattern: a regex (full match on the qualified name) or a list of name suffixes.

    Names are qualified from the unwrapped model (e.g. `model.layers.0.self_attn.q_proj`).
    """
    base = unwrap_model(model)
    found = [
        (name, module)
        for name, module in base.named_modules()
        if name and _matches(name, target_modules) and (module_type is None or isinstance(module, module_type))
    ]
    if not found:
        raise ValueError(f"No module of {type(base).__name__} matches target_modules={target_modules!r}.")
    return found
