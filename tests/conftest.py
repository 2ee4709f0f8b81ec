import os
import sys


sys.path.insert(0, os.path.dirname(__file__))

from testing_utils import set_offline_env


# Before anything imports huggingface_hub / transformers: no network, no telemetry
set_offline_env()

import pytest  # noqa: E402
import torch  # noqa: E402
from testing_utils import (  # noqa: E402
    ARCHITECTURES,
    DATASET_FORMATS,
    build_model,
    build_tokenizer,
)


torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(str(path))
    return str(path)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request):
    return request.param


@pytest.fixture
def tiny_model():
    """Factory: `tiny_model(arch="llama", layers=2, hidden=32, seed=0)` builds a fresh tiny causal LM."""
    return build_model


@pytest.fixture(params=sorted(DATASET_FORMATS))
def dataset_format(request):
    return request.param
