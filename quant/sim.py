"""The simulated integer-only model: a transformers model with a quantizer at every tensor of the scheme.

``simulate(model, scheme)`` rewrites a Llama or Gemma-3 causal LM *in place*: linears, norms and the MLP
activation get quantizers (their classes are swapped for quantizing subclasses, so parameter names, the
``state_dict`` and ``save_pretrained`` stay those of the float model), and attention runs through the
registered ``"mq_sim"`` attention function, which quantizes Q, K, V, the raw scores, the softmax
probabilities and the PV output. A quantizer that is off is the identity and the code path is then
the float model's own, so the simulation with every quantizer off reproduces the float model exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import kernels
from .quantizer import Quantizer
from .scheme import Scheme, get_scheme

ATTN_IMPL = "mq_sim"

# Architecture adapters: which norm plays which role, and the MLP activation.
ARCHS = {
    "llama": {
        "norms": {"input_layernorm": "norm", "post_attention_layernorm": "norm"},
        "ffn_norm": "post_attention_layernorm",  # the norm that feeds gate/up
        "attn_branch_end": "self_attn",  # the module whose output the first residual add takes
        "unit_offset_norm": False,
    },
    "gemma3_text": {
        "norms": {
            "input_layernorm": "norm",
            "pre_feedforward_layernorm": "norm",
            "post_attention_layernorm": "post_norm",
            "post_feedforward_layernorm": "post_norm",
            "self_attn.q_norm": "qk_norm",
            "self_attn.k_norm": "qk_norm",
        },
        "ffn_norm": "pre_feedforward_layernorm",
        "attn_branch_end": "post_attention_layernorm",
        "unit_offset_norm": True,  # Gemma norms multiply by (1 + w)
    },
}
ARCHS["gemma3"] = ARCHS["gemma3_text"]

# linear name -> (input role, weight role, output role)
LINEAR_ROLES = {
    "self_attn.q_proj": (None, "qkv.weight", "qkv.out"),
    "self_attn.k_proj": (None, "qkv.weight", "qkv.out"),
    "self_attn.v_proj": (None, "qkv.weight", "qkv.out"),
    "self_attn.o_proj": (None, "o.weight", "o.out"),  # its input is attn.out
    "mlp.gate_proj": (None, "gate_up.weight", "gate_up.out"),
    "mlp.up_proj": (None, "gate_up.weight", "gate_up.out"),
    "mlp.down_proj": ("down.in", "down.weight", "down.out"),
}
NORM_ROLES = {  # kind -> (input role, weight role, output role)
    "norm": ("norm.in", "norm.weight", "norm.out"),
    "post_norm": (None, "post_norm.weight", None),
    "qk_norm": (None, "qk_norm.weight", None),
}


def arch_of(model: nn.Module) -> dict:
    mt = getattr(model.config, "model_type", None)
    if mt not in ARCHS:
        raise ValueError(f"model type {mt!r} is not supported by the simulator; supported: {sorted(ARCHS)}")
    return ARCHS[mt]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are: token ids and buffers made outside it go there."""
    return next(model.parameters()).device


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _q(scheme: Scheme, role: str | None, name: str) -> Quantizer:
    return Quantizer(scheme.spec(role) if role else None, name, role)


class _LetScale(torch.autograd.Function):
    """``(w * col) / row[:, None]`` for a frozen weight, with the fused CPU loops of ``quant.kernels``.

    As torch operations the reparametrisation is two passes forward and five backward (the quotient's
    rule needs ``g / row`` and ``-g * y / row^2``, the product's ``g * w``, each then reduced) over every
    weight in every step (14 ms per SmolLM2 layer on one thread with both scales on every weight). The
    loops do one pass each way, 5x faster; the forward is bit-identical to the torch operations.
    """

    @staticmethod
    def forward(ctx, w, col, row):
        ctx.save_for_backward(w, col, row)
        return kernels.let_forward(w, col, row)

    @staticmethod
    def backward(ctx, g):
        w, col, row = ctx.saved_tensors
        gcol, grow = kernels.let_backward(w, g, col, row)
        return None, (gcol if ctx.needs_input_grad[1] else None), (grow if ctx.needs_input_grad[2] else None)


class _CachedWeight:
    """Fake-quantizes the weight once per (weight, encoding) version when no gradient is needed.

    While an equivalent transformation is being learned (``_let`` set by ``quant.learn``), the effective
    weight is ``W * col / row`` for the layer's current LET scales; nothing is cached then, because the
    weight changes with every optimizer step.
    """

    _let = None  # (column-scale fn | None, row-divisor fn | None) while LET is attached

    def base_weight(self) -> torch.Tensor:
        return self.weight

    def effective_weight(self) -> torch.Tensor:
        w = self.base_weight()
        if self._let is not None:
            col, row = (f() if f is not None else None for f in self._let)
            if kernels.let_usable(w, col, row):
                ones = w.new_ones(())
                return _LetScale.apply(w, ones.expand(w.shape[1]) if col is None else col,
                                       ones.expand(w.shape[0]) if row is None else row)
            if col is not None:
                w = w * col
            if row is not None:
                w = w / (row.unsqueeze(-1) if w.dim() == 2 else row)
        return w

    def effective_bias(self):
        b = getattr(self, "bias", None)
        if b is not None and self._let is not None and self._let[1] is not None:
            b = b / self._let[1]()
        return b

    def _quantized_weight(self) -> torch.Tensor:
        q = self.weight_quantizer
        if not q.active:
            return self.effective_weight()
        w = self.weight
        if self._let is not None or q.learning or (torch.is_grad_enabled() and w.requires_grad):
            return q(self.effective_weight())
        key = (w.data_ptr(), w._version, q.generation, q.scale._version, q.offset._version)
        if getattr(self, "_wq_key", None) != key:
            self._wq = q(self.effective_weight()).detach()
            self._wq_key = key
        return self._wq


class QLinear(_CachedWeight, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        y = F.linear(x, self._quantized_weight(), self.effective_bias())
        return self.output_quantizer(y, inplace=True)


class QNormMixin(_CachedWeight):
    """RMSNorm with quantized input, gain and output. ``unit_offset``: Gemma's ``x_hat * (1 + w)``.

    ``x * rsqrt(mean(x^2) + eps) * g`` is ONNX's RMSNormalization, the op the export writes and the HTP
    runs natively, so the simulation, the exported graph and the NPU compute the norm in one form (equal
    to the export on onnxruntime's CPU within float32 rounding, ``tests/test_htp_norm.py``).
    """

    unit_offset = False

    def base_weight(self) -> torch.Tensor:
        return 1.0 + self.weight.float() if self.unit_offset else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        if not self.weight_quantizer.active and self._let is None:
            y = super().forward(x)
        else:
            g = self._quantized_weight()
            eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
            y = (h * g.float()).to(x.dtype) if self.unit_offset else g * h.to(x.dtype)
        return self.output_quantizer(y, inplace=True)


class QActivation(nn.Module):
    """The MLP activation. For SiLU the sigmoid branch and the product are both quantized (x * q(sigmoid(x)))."""

    def __init__(self, inner: nn.Module, is_silu: bool, sigmoid_q: Quantizer, out_q: Quantizer):
        super().__init__()
        self.inner = inner
        self.is_silu = is_silu
        self.sigmoid_quantizer = sigmoid_q
        self.output_quantizer = out_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = self.sigmoid_quantizer
        if self.is_silu and sq.spec is not None and sq.enabled:  # quantizing or observing
            y = x * sq(torch.sigmoid(x), inplace=True)
        else:
            y = self.inner(x)
        return self.output_quantizer(y, inplace=True)


class AttnQuantizers(nn.Module):
    def __init__(self, scheme: Scheme, prefix: str):
        super().__init__()
        for short in ("q", "k", "v", "scores", "probs", "out"):
            setattr(self, short, _q(scheme, f"attn.{short}", f"{prefix}.{short}"))


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def sim_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """Eager attention (same op order as transformers' eager path) with the reference's quantization sites.

    query: (B, H, T, D); key/value: (B, H_kv, S, D); returns ((B, T, H, D), probs).
    """
    aq = getattr(module, "attn_quant", None)
    if scaling is None:
        scaling = module.head_dim**-0.5
    if aq is not None:
        query, key, value = aq.q(query), aq.k(key), aq.v(value)
    key_states = _repeat_kv(key, module.num_key_value_groups)
    value_states = _repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key_states.transpose(2, 3))
    if aq is not None:
        scores = aq.scores(scores, inplace=True)  # the reference quantizes before the 1/sqrt(d) scale and the mask
    attn_weights = scores * scaling
    if softcap is not None:
        attn_weights = torch.tanh(attn_weights / softcap) * softcap
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    probs = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if aq is not None:
        probs = aq.probs(probs, inplace=True)
    probs_d = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs_d, value_states)
    if aq is not None:
        out = aq.out(out, inplace=True)
    return out.transpose(1, 2).contiguous(), probs


def _register_attention() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, sim_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, eager_mask)


def _swap_class(module: nn.Module, mixin: type, **attrs) -> None:
    cls = module.__class__
    if issubclass(cls, mixin):
        return
    name = f"Q{cls.__name__}"
    module.__class__ = type(name, (mixin, cls), attrs)


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def simulate(model: nn.Module, scheme: str | Scheme) -> nn.Module:
    """Insert the quantizers of ``scheme`` into ``model`` in place and return it.

    Quantizers start uncalibrated: call :func:`calibrate` (or load encodings) before evaluating.
    """
    scheme = get_scheme(scheme)
    arch = arch_of(model)
    if getattr(model, "mq_scheme", None) is not None:
        raise ValueError("model is already simulated; load a fresh float model to change the scheme")
    _register_attention()
    for i, layer in enumerate(decoder_layers(model)):
        prefix = f"model.layers.{i}"
        for lname, (rin, rw, rout) in LINEAR_ROLES.items():
            lin = _get(layer, lname)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{prefix}.{lname} is {type(lin).__name__}, expected nn.Linear")
            lin.__class__ = QLinear
            lin.input_quantizer = _q(scheme, rin, f"{prefix}.{lname}.input")
            lin.weight_quantizer = _q(scheme, rw, f"{prefix}.{lname}.weight")
            lin.output_quantizer = _q(scheme, rout, f"{prefix}.{lname}.output")
        for nname, kind in arch["norms"].items():
            norm = _get(layer, nname)
            rin, rw, rout = NORM_ROLES[kind]
            _swap_class(norm, QNormMixin, unit_offset=arch["unit_offset_norm"])
            norm.input_quantizer = _q(scheme, rin, f"{prefix}.{nname}.input")
            norm.weight_quantizer = _q(scheme, rw, f"{prefix}.{nname}.weight")
            norm.output_quantizer = _q(scheme, rout, f"{prefix}.{nname}.output")
        mlp = layer.mlp
        is_silu = getattr(model.config, "hidden_act", getattr(model.config, "hidden_activation", "")) == "silu"
        mlp.act_fn = QActivation(
            mlp.act_fn, is_silu,
            _q(scheme, "act.sigmoid" if is_silu else None, f"{prefix}.mlp.act_fn.sigmoid"),
            _q(scheme, "act.out", f"{prefix}.mlp.act_fn.output"),
        )
        layer.self_attn.attn_quant = AttnQuantizers(scheme, f"{prefix}.self_attn.attn")
    _attach_model_level(model, scheme, arch)
    model.config._attn_implementation = ATTN_IMPL
    model.mq_scheme = scheme
    return model


# -- model-level roles (the device table): embedding output, residual stream, final norm, lm_head --------
# Only attached when the scheme quantizes them, so the reference schemes run exactly the code they always
# ran. The residual adds happen inside transformers' decoder-layer forward, so they are reached by hooks:
# the attention branch returns ``q(r + a) - r`` (the add then yields ``q(r + a)`` to within one float32
# rounding of the sum), and the layer's output, the second add, is quantized as it leaves the layer.

def _quantize_output(module, args, out):
    return module.output_quantizer(out)


def _stash_residual(layer, args, kwargs):
    layer._mq_residual_in = args[0] if args else kwargs["hidden_states"]


def _attn_residual_hook(layer):
    def hook(_module, _args, out):
        q = layer.residual_quantizers["attn"]
        if q.spec is None or not q.enabled:
            return None  # off: the float model's own add, bit for bit
        r, a = layer._mq_residual_in, out[0] if isinstance(out, tuple) else out
        y = q(r + a)
        if q.observing:  # calibration sees the sum; the add itself stays the float one
            return None
        return (y - r,) + tuple(out[1:]) if isinstance(out, tuple) else y - r
    return hook


def _quantize_layer_output(layer, _args, out):
    q = layer.residual_quantizers["out"]
    return (q(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else q(out)


def _attach_model_level(model: nn.Module, scheme: Scheme, arch: dict) -> None:
    if scheme.spec("embed.out") is not None:
        emb = model.model.embed_tokens
        emb.output_quantizer = _q(scheme, "embed.out", "model.embed_tokens.output")
        emb.register_forward_hook(_quantize_output)
    if scheme.spec("residual") is not None:
        for i, layer in enumerate(decoder_layers(model)):
            p = f"model.layers.{i}"
            layer.residual_quantizers = nn.ModuleDict({"attn": _q(scheme, "residual", f"{p}.attn_residual"),
                                                       "out": _q(scheme, "residual", f"{p}.output")})
            layer.register_forward_pre_hook(_stash_residual, with_kwargs=True)
            _get(layer, arch["attn_branch_end"]).register_forward_hook(_attn_residual_hook(layer))
            layer.register_forward_hook(_quantize_layer_output)
    if any(scheme.spec(r) is not None for r in ("final_norm.in", "final_norm.weight", "final_norm.out")):
        norm = model.model.norm
        _swap_class(norm, QNormMixin, unit_offset=arch["unit_offset_norm"])
        for kind in ("in", "weight", "out"):
            name = {"in": "input", "weight": "weight", "out": "output"}[kind]
            setattr(norm, f"{name}_quantizer", _q(scheme, f"final_norm.{kind}", f"model.norm.{name}"))
    if scheme.spec("lm_head.weight") is not None or scheme.spec("lm_head.out") is not None:
        head = model.lm_head
        head.__class__ = QLinear
        head.input_quantizer = _q(scheme, None, "lm_head.input")
        head.weight_quantizer = _q(scheme, "lm_head.weight", "lm_head.weight")
        head.output_quantizer = _q(scheme, "lm_head.out", "lm_head.output")


def quantizers(model: nn.Module, kind: str = "all") -> dict[str, Quantizer]:
    """Quantizers with a spec, by tensor name. ``kind``: ``all`` | ``weight`` | ``act``."""
    out = {}
    for m in model.modules():
        if isinstance(m, Quantizer) and m.spec is not None:
            is_w = m.name.endswith(".weight")
            if kind == "all" or (kind == "weight") == is_w:
                out[m.name] = m
    return out


def weight_owners(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own a weight quantizer (QLinear, quantized norms), by tensor name of the weight."""
    return {m.weight_quantizer.name: m for m in model.modules()
            if isinstance(m, _CachedWeight) and m.weight_quantizer.spec is not None}


@torch.no_grad()
def calibrate_weights(model: nn.Module) -> None:
    """Min/max ranges for every weight quantizer from the current weights."""
    for m in weight_owners(model).values():
        q = m.weight_quantizer
        mn, mx = q._reduce(m.effective_weight())
        q.set_range(mn, mx)


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches, progress: bool = True) -> None:
    """Static per-tensor min/max ranges of every activation quantizer from a float pass over ``batches``.

    ``batches`` yields LongTensors (B, T) of token ids. Weight quantizers are off during the pass, as the
    reference computes activation ranges on the float (smoothed) model.
    """
    acts = quantizers(model, "act")
    wqs = quantizers(model, "weight")
    for q in wqs.values():
        q.enabled = False
    for q in acts.values():
        q.observing, q.obs_min, q.obs_max = True, None, None
    was_training = model.training
    model.eval()
    dev = model_device(model)
    try:
        for ids in tqdm(list(batches), desc="calibrating ranges", disable=not progress, unit="batch"):
            model(input_ids=ids.to(dev), use_cache=False)
        for q in acts.values():
            q.finish_observing()
    finally:
        for q in acts.values():
            q.observing = False
        for q in wqs.values():
            q.enabled = True
        model.train(was_training)


@contextmanager
def quantizers_off(qs):
    """The given quantizers off inside the block; each gets its own earlier state back afterwards."""
    qs = list(qs)
    before = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    try:
        yield
    finally:
        for q, e in zip(qs, before):
            q.enabled = e


@contextmanager
def float_mode(model: nn.Module):
    """Every quantizer off (the float model, exactly) inside the block; restored afterwards."""
    with quantizers_off(m for m in model.modules() if isinstance(m, Quantizer)):
        yield model


def check_calibrated(model: nn.Module) -> None:
    missing = [n for n, q in quantizers(model).items() if not q.calibrated]
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers have no range (first: {missing[0]}); calibrate first")
