"""Loading GGUF checkpoints as plain, trainable, savable transformers models.

transformers loads a GGUF file by de-quantizing it into float weights, but leaves a GGUF quantizer on the model and a
`quantization_config` in its config. The weights are ordinary tensors, yet that marker makes `save_pretrained` refuse
("quantized with gguf and is not serializable"), makes `Trainer` refuse to train ("that quantization method do not
support training"), and, once the model is saved anyway, travels in `config.json` so the saved folder is refused in
turn. Here a GGUF file is loaded with `GgufConfig(dequantize=True)`, which drops the marker; a model loaded by other
means is cleaned by `strip_gguf_quantization`, and a folder whose `config.json` still carries the marker is loaded
without it (`load_model`).
"""

from __future__ import annotations

import json
import logging
import os


logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"


def split_gguf_path(name: str) -> tuple[str, str] | None:
    """`(folder, file name)` for a path to an existing `.gguf` file, else `None`."""
    if isinstance(name, str) and name.lower().endswith(GGUF_SUFFIX) and os.path.isfile(name):
        folder, file_name = os.path.split(os.path.abspath(name))
        return folder, file_name
    return None


def folder_has_gguf_config(folder: str) -> bool:
    """Whether `folder/config.json` carries a GGUF `quantization_config` (a leftover of saving a GGUF-loaded model)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        quantization = json.load(f).get("quantization_config") or {}
    return str(quantization.get("quant_method", "")).lower() == "gguf"


def is_gguf_quantized(model) -> bool:
    """Whether `model` carries transformers' GGUF quantizer (what a `from_pretrained(..., gguf_file=...)` leaves)."""
    from ..compat import quantization_method

    return str(quantization_method(model) or "").lower().endswith("gguf")


def strip_gguf_quantization(model, name: str | None = None):
    """Drop the GGUF quantizer from a model whose weights were de-quantized at load, so it trains and saves.

    Refuses (ValueError) when some weights are still GGUF-packed (transformers keeps them packed when the `kernels`
    package provides a GGUF matmul): those cannot be trained; load with `load_model` (de-quantizes everything).
    """
    from ..compat import remove_quantization

    if not is_gguf_quantized(model):
        return model
    import torch

    packed = [n for n, p in model.named_parameters() if not torch.is_floating_point(p)]
    if packed:
        raise ValueError(
            f"{name or type(model).__name__} keeps {len(packed)} GGUF-packed weight(s) (e.g. {packed[0]}), which cannot "
            "be trained or saved as safetensors. Load it with `trl_safety.models.load_model(path)` or "
            "`from_pretrained(..., gguf_file=..., quantization_config=GgufConfig(dequantize=True))`."
        )
    remove_quantization(model)
    logger.info(
        "Removed the GGUF quantization marker of %s: its weights are plain float tensors.", name or "the model"
    )
    return model


def load_model(name_or_path: str, gguf_file: str | None = None, *, with_tokenizer: bool = True, **kwargs):
    """`(model, tokenizer)` from a GGUF file (`path/x.gguf`, or a folder with `gguf_file=`) or a model folder, as a
    plain float model that trains and saves as safetensors. `kwargs` go to `from_pretrained` (`dtype`, ...).

    A folder whose `config.json` still has a GGUF `quantization_config` is loaded without it, with a warning.
    The tokenizer is `None` when `with_tokenizer` is false.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    split = split_gguf_path(name_or_path)
    if split is not None:
        if gguf_file is not None and gguf_file != split[1]:
            raise ValueError(f"{name_or_path!r} is a GGUF file, but `gguf_file={gguf_file!r}` names another one.")
        name_or_path, gguf_file = split
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if gguf_file is not None:
        if "quantization_config" in kwargs:
            raise ValueError(
                "A GGUF file is loaded de-quantized; `quantization_config` cannot be combined with `gguf_file`."
            )
        _require_gguf_package()
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True), **kwargs
        )
        strip_gguf_quantization(model, gguf_file)  # no-op when transformers already dropped it
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file) if with_tokenizer else None
        return model, tokenizer
    if os.path.isdir(name_or_path) and folder_has_gguf_config(name_or_path):
        logger.warning(
            "%s/config.json carries a GGUF `quantization_config` (left by saving a GGUF-loaded model); its weights "
            "are plain, so it is loaded without it. Save the model again to drop it from the folder.",
            name_or_path,
        )
        config = AutoConfig.from_pretrained(name_or_path)
        del config.quantization_config
        kwargs["config"] = config
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path) if with_tokenizer else None
    return model, tokenizer


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(
            "Loading a GGUF file needs the `gguf` package: `pip install gguf` (or `pip install 'trl-safety[smollm2]'`)."
        ) from None
