"""Run a decoder stack one layer at a time, outside the model's own forward.

Block-wise and end-to-end training need the hidden states between layers and the extra arguments each
layer receives (rotary embeddings, the causal mask: Gemma-3 alternates sliding and global layers, so they
differ per layer). ``LayerRunner`` records those arguments once per input shape with pre-hooks during one
float forward, then calls layers directly.
"""

from __future__ import annotations

import torch
from torch import nn

from .sim import decoder_layers, float_mode, model_device


class LayerRunner:
    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = decoder_layers(model)
        self._kwargs: dict[tuple, list[dict]] = {}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The first layer's input (Gemma's embedding module includes its sqrt(d) scale)."""
        emb = self.model.model.embed_tokens
        return emb(ids.to(emb.weight.device))

    @torch.no_grad()
    def capture(self, ids: torch.Tensor) -> torch.Tensor:
        """Record every layer's keyword arguments for ``ids.shape``; returns the first layer's input."""
        seen, handles = {}, []

        def hook(i):
            def fn(_mod, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                seen[i] = (h.detach().clone() if i == 0 else None, kw)
            return fn

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(hook(i), with_kwargs=True))
        try:
            with float_mode(self.model):
                self.model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if len(seen) != len(self.layers):
            raise RuntimeError(f"captured {len(seen)} of {len(self.layers)} decoder layers")
        self._kwargs[tuple(ids.shape)] = [seen[i][1] for i in range(len(self.layers))]
        first = seen[0][0]
        with float_mode(self.model):  # (an embedding output quantizer, the device table's, is off here too)
            same = torch.equal(first, self.embed(ids))
        if not same:
            raise RuntimeError("the first decoder layer's input is not the embedding output; unsupported model")
        return first

    def kwargs(self, batch: int, seqlen: int) -> list[dict]:
        key = (batch, seqlen)
        if key not in self._kwargs:
            # masks and rotary tables depend on shapes only, so any token ids do
            self.capture(torch.zeros(key, dtype=torch.long, device=model_device(self.model)))
        return self._kwargs[key]

    def layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out = self.layers[i](h, **self.kwargs(h.shape[0], h.shape[1])[i])
        return out[0] if isinstance(out, tuple) else out

    def stack(self, h: torch.Tensor, layers=None) -> torch.Tensor:
        for i in (range(len(self.layers)) if layers is None else layers):
            h = self.layer(i, h)
        return h
