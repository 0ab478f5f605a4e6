"""CUDA graphs for the training losses: one replay instead of tens of thousands of kernel launches.

A MobileQuant step on a GPU is bound by launches, not arithmetic: about 20 fake-quant sites per decoder
layer, each a handful of small kernels forward and backward, came to 36.8k launches per SmolLM2 step
with the GPU busy about 106 ms of 735 (``bench/step_overhead.py --device cuda --profile``). Capturing the
loss's forward and backward once (``torch.cuda.make_graphed_callables``) and replaying it removes the
launch cost and the Python that issues them; the optimizer step, the loss check and the schedule stay
eager, so the training loop and its checkpoints are unchanged.

A graph bakes in shapes and Python-side choices, which is why: the first call for a shape runs eagerly
(the layer runner records its rotary tables and masks then, outside any capture); the graph is taken on
the second call; other shapes (a short last batch) get their own graph or run eagerly; short runs,
where capture would cost more than it saves, stay eager.

Opt-in (``MQFARM_CUDA_GRAPHS=1``) until it has run on a GPU: it was written in a session that had none.
``tests/test_graphs.py`` holds the check to run first (graphed training against eager, end to end and
block-wise), and ``bench/step_overhead.py --device cuda`` times both.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ENV = "MQFARM_CUDA_GRAPHS"
MIN_STEPS = 16  # capture costs about three eager steps (warm-up plus capture)
MAX_SHAPES = 2


def graphs_enabled(device: torch.device) -> bool:
    """Graphs are used on CUDA when ``MQFARM_CUDA_GRAPHS`` is 1 (default 0, see the module's note)."""
    value = os.environ.get(ENV, "0").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"{ENV} must be 0 or 1 (also off/on, false/true), got {os.environ[ENV]!r}")
    return device.type == "cuda" and value in ("1", "true", "on")


class _LossModule(nn.Module):
    """Gives ``make_graphed_callables`` the learnables as module parameters: LET scales live in closures,
    not in any module, so the model itself would not expose them."""

    def __init__(self, fn, params):
        super().__init__()
        self.fn = fn
        self.learnables = nn.ParameterList(params)

    def forward(self, *args):
        return self.fn(*args)


class GraphedLoss:
    """``fn(*tensors) -> scalar loss`` whose gradient flows to ``params``, replayed from a CUDA graph.

    Call it like ``fn``; backward through the result fills ``p.grad`` as eager autograd would. ``steps``
    is how many calls the run will make (below ``MIN_STEPS`` nothing is captured).
    """

    def __init__(self, fn, params, device: torch.device, steps: int):
        self.fn = fn
        self.params = [p for p in params if p.requires_grad]
        self.enabled = bool(self.params) and steps >= MIN_STEPS and graphs_enabled(torch.device(device))
        self._graphs: dict[tuple, nn.Module] = {}
        self._seen: set[tuple] = set()
        self.captured = 0

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not torch.is_grad_enabled() or any(a.device.type != "cuda" for a in args):
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        graphed = self._graphs.get(key)
        if graphed is None:
            if key not in self._seen or len(self._graphs) >= MAX_SHAPES:
                self._seen.add(key)
                return self.fn(*args)
            graphed = self._graphs[key] = self._capture(args)
        return graphed(*args)

    def _capture(self, args) -> nn.Module:
        module = _LossModule(self.fn, self.params)
        # the graph reads its inputs from these buffers; every replay copies the new batch into them
        static = tuple(a.detach().clone() for a in args)
        graphed = torch.cuda.make_graphed_callables(module, static, num_warmup_iters=2, allow_unused_input=True)
        self.captured += 1
        return graphed

    def release(self) -> None:
        """Drop the graphs and their memory pools (block-wise training makes one set per layer)."""
        self._graphs.clear()
        self.enabled = False
