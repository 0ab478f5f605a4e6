"""Perplexity over non-overlapping windows (the paper's WikiText protocol, on our evaluation corpus).

Definition: the evaluation token stream is cut into consecutive, non-overlapping windows of ``seqlen``
tokens (remainder dropped); in each window, every token after the first is predicted from the tokens
before it in that window; ``ppl = exp(sum of NLL / number of predicted tokens)``. With a BOS-prefixed
window the BOS is context only. Example: 3 windows of 512 tokens -> 3 * 511 predictions.
The metric is named ``ppl/<corpus>/seq<seqlen>`` so it is never mistaken for lm-eval's word perplexity.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..sim import model_device


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    corpus: str
    seconds: float
    tokens_per_s: float  # tokens processed (windows * seqlen) per second of forward time

    @property
    def metric_name(self) -> str:
        return f"ppl/{self.corpus}/seq{self.seqlen}"

    def to_dict(self) -> dict:
        return asdict(self) | {"metric": self.metric_name}


@torch.no_grad()
def window_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of tokens 1..T-1 of each window given its prefix: (B,) float64.

    ``model``: a causal LM, or any callable ``ids (B, T) -> logits (B, T, V)`` (an exported graph run by
    onnxruntime: the deployed model goes through the same arithmetic as the simulated one).
    """
    is_module = isinstance(model, torch.nn.Module)
    logits = model(input_ids=ids, use_cache=False).logits if is_module else model(ids)  # (B, T, V)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = ids[:, 1:].unsqueeze(-1)
    return -logp.gather(-1, tgt).squeeze(-1).double().sum(dim=1)


def perplexity(model, windows: torch.Tensor, corpus: str = "wiki", batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` over ``windows`` (N, T) of token ids; see the module docstring."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, T>=2) token ids, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    is_module = isinstance(model, torch.nn.Module)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
    device = model_device(model) if is_module else torch.device("cpu")
    total = 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=windows.shape[0], desc="perplexity", unit="win", disable=not progress)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(device)
            total += float(window_nll(model, batch).sum())
            bar.update(batch.shape[0])
            bar.set_postfix(ppl=f"{math.exp(total / ((start + batch.shape[0]) * (windows.shape[1] - 1))):.3f}")
    finally:
        bar.close()
        if is_module:
            model.train(was_training)
    seconds = time.perf_counter() - t0
    n, t = windows.shape
    predicted = n * (t - 1)
    nll = total / predicted
    return PerplexityResult(math.exp(nll), nll, predicted, n, t, corpus, seconds, n * t / seconds)
