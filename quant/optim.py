"""AdamW with one learning-rate multiplier per parameter, so that a whole kind of learnables is one group.

Relative range learning rates (``TrainConfig.lrl_relative``) give every range parameter its own rate. As
``torch.optim.AdamW`` groups that is one group per parameter (1,200 on SmolLM2 end to end), and the
per-group work made the optimizer a third of a GPU training step (``bench/step_overhead.py --device cuda
--profile``: 0.33 s of 1.07 s, 45k kernel launches a step). Here each group holds a ``scales`` list and
the update runs as a handful of multi-tensor operations for the group.

The arithmetic is AdamW's (``torch.optim.AdamW``, ``amsgrad=False``), with the step of parameter ``i``
taken at ``lr * scales[i]``; weight decay is not offered because no learnable here uses it.
"""

from __future__ import annotations

import math

import torch


class ScaledAdamW(torch.optim.Optimizer):
    """``groups``: dicts with ``params``, ``lr`` and optionally ``scales`` (one float per parameter,
    default 1.0) plus any bookkeeping keys (they are kept and saved)."""

    def __init__(self, groups, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        groups = [dict(g) for g in groups]
        for g in groups:
            g["params"] = list(g["params"])
            scales = g.setdefault("scales", [1.0] * len(g["params"]))
            if len(scales) != len(g["params"]):
                raise ValueError(f"group has {len(g['params'])} parameters but {len(scales)} scales")
        super().__init__(groups, {"lr": 1e-3, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ScaledAdamW takes no closure")
        for g in self.param_groups:
            beta1, beta2 = g["betas"]
            params, grads, m, v, sizes = [], [], [], [], []
            step = None
            for p, scale in zip(g["params"], g["scales"]):
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                step = st["step"]
                params.append(p)
                grads.append(p.grad)
                m.append(st["exp_avg"])
                v.append(st["exp_avg_sq"])
                sizes.append(scale)
            if not params:
                continue
            # every parameter of a group is stepped together, so they share the step count
            bc1 = 1 - beta1 ** step
            bc2_sqrt = math.sqrt(1 - beta2 ** step)
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, g["eps"])
            torch._foreach_addcdiv_(params, m, denom, [-g["lr"] * s / bc1 for s in sizes])
        return None
