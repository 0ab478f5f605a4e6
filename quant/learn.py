"""The trainable tensors of OmniQuant-style and MobileQuant training, attached to a simulated model.

* **LET** (learnable equivalent transformation): one positive-initialised scale vector per pair and
  layer (``quant.equiv``), applied as a *temporary* reparametrisation of the effective weights, so the
  weight ranges follow the smoothing in every step; ``|s|`` is kept at least 1e-2 with a
  straight-through gradient (the reference's ``TruncateFunction``).
* **LWC** (learnable weight clipping): sigmoid factors on every weight quantizer's min and max.
* **LRL** (learnable ranges): every activation quantizer's scale and offset become parameters.

``fold`` makes the result permanent: LET is multiplied into the weights, the weights are clamped to the
LWC range (so min/max of the stored weight *is* the learned range), weight encodings are recomputed
from the stored weights and learned activation ranges are frozen with integer offsets. After it, the
model is a plain simulated model whose state_dict is the float checkpoint an artifact stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .equiv import Pair, layer_pairs
from .quantizer import Quantizer
from .sim import _CachedWeight, decoder_layers

LET_MIN = 1e-2


def _truncate(s: torch.Tensor) -> torch.Tensor:
    sign = torch.where(s >= 0, 1.0, -1.0)
    t = sign * s.abs().clamp(min=LET_MIN)
    return s + (t - s).detach()


@dataclass
class Learnables:
    """Named trainable tensors by kind; names are stable so checkpoints resume across processes."""

    let: dict = field(default_factory=dict)
    lwc: dict = field(default_factory=dict)
    lrl: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    # the natural size of each range parameter (initial |scale|, or the number of levels for an offset):
    # relative learning rates multiply by it, so a 16-bit and an 8-bit site move by the same fraction
    lrl_unit: dict = field(default_factory=dict)

    def named(self) -> dict[str, nn.Parameter]:
        return {**self.let, **self.lwc, **self.lrl}

    def counts(self) -> dict:
        return {k: sum(p.numel() for p in getattr(self, k).values()) for k in ("let", "lwc", "lrl")}

    def state_dict(self) -> dict:
        return {n: p.detach().clone() for n, p in self.named().items()}

    def load_state_dict(self, state: dict) -> None:
        named = self.named()
        if set(state) != set(named):
            missing, extra = sorted(set(named) - set(state))[:3], sorted(set(state) - set(named))[:3]
            raise ValueError(f"checkpoint tensors do not match the model (missing {missing}, unexpected {extra})")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state[n])


def _layer_owners(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if isinstance(m, _CachedWeight) and m.weight_quantizer.spec is not None]


def _layer_act_quantizers(layer: nn.Module) -> list[Quantizer]:
    return [m for m in layer.modules()
            if isinstance(m, Quantizer) and m.spec is not None and not m.name.endswith(".weight")]


def attach(model: nn.Module, layers: list[int] | None = None, pairs: str | tuple = "modified",
           let: bool = True, lwc: bool = True, lrl: bool = False, lwc_init: float = 4.0) -> Learnables:
    """Attach trainable LET/LWC/LRL tensors to the chosen decoder layers (all by default)."""
    all_layers = decoder_layers(model)
    idx = list(range(len(all_layers))) if layers is None else list(layers)
    plist: list[Pair] = layer_pairs(model, pairs) if let else []
    out = Learnables(layers=idx)
    for i in idx:
        layer = all_layers[i]
        cols, rows = {}, {}
        for p in plist:
            prod = layer.get_submodule(p.producer)
            s = nn.Parameter(torch.ones(prod.weight.shape[0], device=prod.weight.device))
            out.let[f"model.layers.{i}.let.{p.name}"] = s
            rows.setdefault(p.producer, []).append(lambda s=s: _truncate(s))
            for c in p.consumers:
                cols.setdefault(c, []).append(lambda s=s, p=p: p.expand(_truncate(s)))
        for path in set(cols) | set(rows):
            mod = layer.get_submodule(path)
            mod._let = (_product(cols.get(path)), _product(rows.get(path)))
        for m in _layer_owners(layer):
            q = m.weight_quantizer
            if lwc:
                up, low = q.enable_lwc(m.weight.shape[0], lwc_init, m.weight.device)
                out.lwc[f"{q.name}.lwc_up"], out.lwc[f"{q.name}.lwc_low"] = up, low
            elif m._let is not None:
                # LET without LWC still needs weight ranges that follow the smoothing every step:
                # sigmoid(30) is 1.0 in float32, so this is min/max of the current weight, frozen
                for t in q.enable_lwc(m.weight.shape[0], 30.0, m.weight.device):
                    t.requires_grad_(False)
        if lrl:
            for q in _layer_act_quantizers(layer):
                s, o = q.make_ranges_learnable()
                out.lrl[f"{q.name}.scale"], out.lrl[f"{q.name}.offset"] = s, o
                out.lrl_unit[f"{q.name}.scale"] = float(s.detach().abs().mean())
                out.lrl_unit[f"{q.name}.offset"] = float(q.spec.qmax - q.spec.qmin)
    return out


def _product(fns):
    if not fns:
        return None
    if len(fns) == 1:
        return fns[0]
    return lambda: torch.stack([f() for f in fns]).prod(0)


@torch.no_grad()
def fold(model: nn.Module, learn: Learnables) -> None:
    """Make LET and LWC permanent in the float weights, freeze learned ranges, detach everything."""
    layers = decoder_layers(model)
    for i in learn.layers:
        owners = [m for m in layers[i].modules() if isinstance(m, _CachedWeight)]
        new = {}
        for m in owners:
            if m._let is not None:
                new[m] = (m.effective_weight().detach().clone(), m.effective_bias())
        for m, (w, b) in new.items():
            _store_effective(m, w)
            if b is not None:
                m.bias.copy_(b.detach())
            m._let = None
        for m in owners:
            q = m.weight_quantizer
            if q.lwc_up is None:
                continue
            w = m.effective_weight()
            mn, mx = q.lwc_bounds(w)
            shape = (-1,) + (1,) * (w.dim() - 1) if q.spec.per_channel else ()
            clipped = torch.maximum(torch.minimum(w, mx.reshape(shape)), mn.reshape(shape))
            _store_effective(m, clipped)
            q.disable_lwc()
            cmn, cmx = q._reduce(m.effective_weight())
            q.set_range(cmn, cmx)
        for q in _layer_act_quantizers(layers[i]):
            if isinstance(q.scale, nn.Parameter):
                q.freeze_ranges()


def _store_effective(m: nn.Module, w: torch.Tensor) -> None:
    if getattr(m, "unit_offset", False):
        w = w - 1.0
    m.weight.copy_(w.to(m.weight.dtype))
