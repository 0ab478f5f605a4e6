"""Shared fixtures. Models come from the embedded zoo (converted once into $MQFARM_CACHE); most tests
use truncated models (the first few real decoder layers, real embedding and head) to stay fast."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# MQFARM_TEST_THREADS: fewer threads when the suite shares the machine (oversubscribed OpenMP threads
# spin against each other and run element-wise ops many times slower)
torch.set_num_threads(int(os.environ.get("MQFARM_TEST_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))

ARCH_MODELS = ["smollm2-135m", "gemma3-270m"]


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
