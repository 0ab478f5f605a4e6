"""Equivalent transformations between adjacent ops of a decoder layer (SmoothQuant, OmniQuant's LET).

A *pair* is a producer whose output channels are divided by a positive vector ``s`` and the consumers
whose input columns are multiplied by it, so the float function is unchanged:

=====  ==============================  ======================  =======================================
pair   producer (÷ s)                  consumers (× s)         why it is exact
=====  ==============================  ======================  =======================================
qkv    input norm gain                 q, k, v columns         the norm's output feeds only q/k/v
fc1    FFN norm gain                   gate, up columns        the FFN norm's output feeds only gate/up
out    v_proj rows (kv channels)       o_proj columns          PV is linear in V; with GQA each kv
                                                               channel scales the columns of every
                                                               query head of its group (``group``)
fc2    up_proj rows                    down_proj columns       down's input act(gate) * up is linear in up
=====  ==============================  ======================  =======================================

The reference applies ``out`` only when ``v.out == o.in`` (multi-head attention); the group expansion
makes it exact for GQA/MQA too, so it applies to SmolLM2 and Gemma-3 as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .sim import arch_of

PAIR_SETS = {
    "original": ("qkv", "fc1"),              # mit-han-lab SmoothQuant
    "omniquant": ("qkv", "fc1", "out"),      # OmniQuant's LET pairs (no up->down)
    "modified": ("qkv", "fc1", "out", "fc2"),  # the reference's default, MobileQuant's LET
}


@dataclass(frozen=True)
class Pair:
    name: str
    producer: str          # module path inside the decoder layer
    producer_is_norm: bool
    consumers: tuple
    stat: str              # the consumer whose input statistics stand for the pair
    group: int = 1         # >1: kv channels expand over this many query heads (the ``out`` pair)
    head_dim: int = 0
    unit_offset: bool = False  # the producer norm computes x_hat * (1 + w) (Gemma)

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """The consumer-side column scale for a producer-side vector ``s``."""
        if self.group == 1:
            return s
        kv = s.shape[0] // self.head_dim
        return s.view(kv, 1, self.head_dim).expand(kv, self.group, self.head_dim).reshape(-1)

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        """Consumer-side per-column statistics reduced (max) to the producer's channels."""
        if self.group == 1:
            return v
        return v.view(-1, self.group, self.head_dim).amax(1).reshape(-1)


def layer_pairs(model: nn.Module, which: str | tuple = "modified") -> list[Pair]:
    names = PAIR_SETS[which] if isinstance(which, str) else tuple(which)
    if isinstance(which, str) and which not in PAIR_SETS:
        raise ValueError(f"unknown pair set {which!r}; available: {', '.join(PAIR_SETS)}")
    arch = arch_of(model)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    all_pairs = {
        "qkv": Pair("qkv", "input_layernorm", True, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    "self_attn.q_proj", unit_offset=arch["unit_offset_norm"]),
        "fc1": Pair("fc1", arch["ffn_norm"], True, ("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_proj",
                    unit_offset=arch["unit_offset_norm"]),
        "out": Pair("out", "self_attn.v_proj", False, ("self_attn.o_proj",), "self_attn.o_proj",
                    group=heads // kv, head_dim=head_dim),
        "fc2": Pair("fc2", "mlp.up_proj", False, ("mlp.down_proj",), "mlp.down_proj"),
    }
    unknown = set(names) - set(all_pairs)
    if unknown:
        raise ValueError(f"unknown pairs {sorted(unknown)}; available: {', '.join(all_pairs)}")
    return [all_pairs[n] for n in names]


def producer_channels(layer: nn.Module, pair: Pair) -> int:
    p = layer.get_submodule(pair.producer)
    return p.weight.shape[0]


@torch.no_grad()
def apply_scale(layer: nn.Module, pair: Pair, s: torch.Tensor) -> None:
    """Fold ``s`` into the float weights of ``layer`` in place (producer ÷ s, consumers × s)."""
    prod = layer.get_submodule(pair.producer)
    s = s.to(prod.weight.dtype)
    if pair.producer_is_norm:
        one = 1.0 if pair.unit_offset else 0.0
        prod.weight.copy_((prod.weight.float() + one) / s.float() - one)
    else:
        prod.weight.div_(s.unsqueeze(1))
        if getattr(prod, "bias", None) is not None:
            prod.bias.div_(s)
    col = pair.expand(s)
    for c in pair.consumers:
        layer.get_submodule(c).weight.mul_(col)


def smoothquant_scale(act_absmax: torch.Tensor, layer: nn.Module, pair: Pair, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max_i |W_ij|^(1-alpha)`` over all consumers, clamped as the reference."""
    w = torch.cat([layer.get_submodule(c).weight.detach().abs().float() for c in pair.consumers], 0).amax(0)
    a = pair.reduce(act_absmax.float())
    w = pair.reduce(w)
    s = a.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)
