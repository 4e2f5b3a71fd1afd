import os
import sys
from pathlib import Path

import pytest

import romer  # noqa: F401  (before any test module loads torch: pins the CPU numerical modes)

sys.path.insert(0, str(Path(__file__).parent))
# Never touch the network or a user's HF cache from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(Path(__file__).parent.parent / ".hf_home_tests"))
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster, and much faster on a loaded machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
