"""Shared fixtures. Models come from the embedded zoo (converted once into $MQFARM_CACHE); most tests
use truncated models (the first few real decoder layers, real embedding and head) to stay fast."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# MQFARM_TEST_THREADS: fewer threads when the suite shares the machine (oversubscribed OpenMP threads
# spin against each other and run element-wise ops many times slower). Under pytest-xdist each worker gets
# its share of the cores, so N workers never run N x cores threads.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
torch.set_num_threads(int(os.environ.get("MQFARM_TEST_THREADS", 0))
                      or max(1, min(2, (os.cpu_count() or 1) // max(1, _workers))))

ARCH_MODELS = ["smollm2-135m", "gemma3-270m"]


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true",
                     help="run the collected tests in reverse order (no test may rely on one that ran before it)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Files that hold a ``slow`` test are collected first (each file keeps its own order). Under
    pytest-xdist's ``--dist loadfile`` the workers take files in collection order, so the long files start
    first and the short ones fill in at the end: the workers finish together instead of one waiting on a
    long file that started last (longest-first scheduling). ``--reverse`` then reverses the whole order."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: file and test order kept otherwise
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(scope="session")
def small_ids():
    """Two evaluation windows of 64 tokens per model, keyed by model name."""
    from quant import data, load_model

    out = {}
    for name in ARCH_MODELS:
        lm = load_model(name, num_layers=1)
        out[name] = (data.eval_windows(lm.tokenizer, 64, limit=2, add_bos=lm.add_bos),
                     data.calibration_windows(lm.tokenizer, 4, 64, seed=0, add_bos=lm.add_bos))
    return out


@pytest.fixture(scope="session", autouse=True)
def _basetemp_fixed_first(tmp_path_factory):
    """pytest makes the root of every tmp_path under $TMPDIR the first time one is asked for. The farm
    tests' contained_env points TMPDIR into a folder it deletes afterwards, so without this the root
    depended on which test came first, and tests after such a module failed to make their tmp_path."""
    tmp_path_factory.getbasetemp()
