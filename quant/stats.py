"""Activation statistics of the float model over calibration data: the input of SmoothQuant.

For every linear of every decoder layer: the per-input-channel ``max |x|`` and the per-tensor min/max of
its input, collected by forward hooks with every quantizer off (the float, unsmoothed model). Results
are cached on disk by (model content, calibration config), so the many trials of a sweep that share an
initialisation compute them once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data
from .sim import decoder_layers, float_mode, model_device
from .zoo import cache_root

STATS_VERSION = 1
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")  # one per distinct input


@dataclass
class ActStats:
    """``absmax[name]``: (in_features,) max |x| per input channel; ``minmax[name]``: (min, max) of the input."""

    absmax: dict
    minmax: dict
    key: str
    windows: int
    tokens: int

    def layer(self, i: int, linear: str) -> torch.Tensor:
        return self.absmax[f"model.layers.{i}.{linear}"]


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of the weights (shapes plus a strided sample of every tensor): cheap, and it changes
    whenever a transformation has been folded into the weights."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def stats_key(model: nn.Module, tokenizer, calib, add_bos: bool) -> str:
    ident = {"version": STATS_VERSION, "model": model_fingerprint(model), "calib": asdict(calib), "bos": add_bos,
             "corpus": data.corpus_id(calib.corpus), "tokenizer": data._tokenizer_id(tokenizer)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def collect(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> tuple[dict, dict]:
    absmax, minmax, hooks = {}, {}, []

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().float()
            am = x.abs().reshape(-1, x.shape[-1]).amax(0)
            mn, mx = x.amin(), x.amax()
            if name in absmax:
                torch.maximum(absmax[name], am, out=absmax[name])
                minmax[name] = (min(minmax[name][0], mn.item()), max(minmax[name][1], mx.item()))
            else:
                absmax[name], minmax[name] = am, (mn.item(), mx.item())
        return fn

    for i, layer in enumerate(decoder_layers(model)):
        for lname in LINEARS:
            mod = layer.get_submodule(lname)
            hooks.append(mod.register_forward_pre_hook(hook(f"model.layers.{i}.{lname}")))
    was_training = model.training
    model.eval()
    dev = model_device(model)
    try:
        with float_mode(model):
            for ids in tqdm(windows.split(batch_size), desc="activation stats", disable=not progress, unit="batch"):
                model(input_ids=ids.to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return absmax, minmax


def activation_stats(lm, calib, progress: bool = True, batch_size: int = 4, use_cache: bool = True) -> ActStats:
    """Statistics of ``lm.model`` on the calibration windows of ``calib`` (a ``CalibConfig``), cached."""
    key = stats_key(lm.model, lm.tokenizer, calib, lm.add_bos)
    path = stats_path(key)
    if use_cache and path.exists():
        blob = torch.load(path, weights_only=True, map_location=model_device(lm.model))
        return ActStats(blob["absmax"], {k: tuple(v) for k, v in blob["minmax"].items()}, key,
                        blob["windows"], blob["tokens"])
    windows = data.calibration_windows(lm.tokenizer, calib.samples, calib.seqlen, calib.seed, calib.corpus,
                                       add_bos=lm.add_bos)
    absmax, minmax = collect(lm.model, windows, batch_size, progress)
    stats = ActStats(absmax, minmax, key, windows.shape[0], windows.numel())
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save({"absmax": {k: v.cpu() for k, v in absmax.items()},
                    "minmax": {k: list(v) for k, v in minmax.items()},
                    "windows": stats.windows, "tokens": stats.tokens}, tmp)
        os.replace(tmp, path)  # atomic: concurrent trials either see the whole file or none
    return stats


def stats_path(key: str) -> Path:
    return cache_root() / "stats" / f"{key}.pt"
