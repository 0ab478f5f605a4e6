"""Where a quantized model loses its perplexity: an error budget by tensor role or by decoder layer.

For each group of quantizers (every site of one role, such as ``down.in``, or every site of one
decoder layer) the group is switched off, the rest stays quantized, and perplexity is measured on the
same windows. A group's *share* is the part of the NLL gap to the float model that switching it off
recovers: ``(nll_quant - nll_without_group) / (nll_quant - nll_fp)``. Shares need not sum to 1: errors
of different sites interact (two sites can each recover most of the gap when both clip the same outlier).

Only evaluation is repeated; the model is quantized once and restored exactly afterwards.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from .eval.perplexity import perplexity
from .quantizer import Quantizer
from .sim import float_mode, quantizers_off

GROUPINGS = ("role", "layer", "kind")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def group_of(q: Quantizer, by: str) -> str:
    if by == "role":
        return q.role or "unknown"
    if by == "layer":
        m = _LAYER.search(q.name)
        return f"layer {int(m.group(1)):02d}" if m else "outside layers"
    if by == "kind":
        return "weights" if q.name.endswith(".weight") else "activations"
    raise ValueError(f"unknown grouping {by!r}; choose one of {', '.join(GROUPINGS)}")


def groups(model: torch.nn.Module, by: str) -> dict[str, list[Quantizer]]:
    """Active quantizers grouped by ``by``, in model order."""
    out: dict[str, list[Quantizer]] = {}
    for m in model.modules():
        if isinstance(m, Quantizer) and m.spec is not None and m.enabled:
            out.setdefault(group_of(m, by), []).append(m)
    return out


@dataclass
class GroupCost:
    group: str
    quantizers: int
    ppl: float  # with this group in float
    nll: float
    share: float  # part of the NLL gap to float that this group accounts for


@dataclass
class ErrorBudget:
    by: str
    windows: int
    seqlen: int
    fp_ppl: float
    quant_ppl: float
    rows: list[GroupCost]  # largest share first

    def to_dict(self) -> dict:
        return asdict(self)


def error_budget(model: torch.nn.Module, windows: torch.Tensor, by: str = "role", progress: bool = True,
                 on_group=None) -> ErrorBudget:
    """Perplexity of ``model`` with each group of ``by`` switched off in turn (see the module docstring).

    ``on_group(done, total, row)`` is called after each group, for progress reports.
    """
    parts = groups(model, by)
    if not parts:
        raise ValueError("the model has no active quantizer: quantize it before asking where its error comes from")
    quant = perplexity(model, windows, progress=progress)
    with float_mode(model):
        fp = perplexity(model, windows, progress=progress)
    gap = quant.nll - fp.nll
    rows = []
    for i, (name, qs) in enumerate(parts.items()):
        with quantizers_off(qs):
            r = perplexity(model, windows, progress=progress)
        share = (quant.nll - r.nll) / gap if gap > 0 else float("nan")
        rows.append(GroupCost(name, len(qs), r.ppl, r.nll, share))
        if on_group:
            on_group(i + 1, len(parts), rows[-1])
    rows.sort(key=lambda r: -r.share)
    return ErrorBudget(by, quant.windows, quant.seqlen, fp.ppl, quant.ppl, rows)
