"""Shared fixtures. Tests run offline on CPU; the repository root is importable."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--precision auto` means fp32 in the tests on every CPU, bf16-capable or not (the smoke suite
# pins --precision fp32 for the same reason): their numbers must not depend on the CI machine.
os.environ["LIS_CPU_BF16"] = "0"

import torch  # noqa: E402

from common.utils import shared_data_dir  # noqa: E402

# One intra-op thread: the tests' tiny models gain nothing from two, and on a busy shared
# machine two threads made them several times slower (spin-waiting threads).
torch.set_num_threads(1)

SHARED = shared_data_dir()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (minutes); excluded from the default run")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"the offline data folder {SHARED} is absent (set LIS_SHARED_DATA)")
    return SHARED
