"""The simulated decoder as two ONNX graphs: prefill (a T-token prompt) and decode (one token + KV cache).

The graph computes what ``quant.sim`` computes, op for op: every active quantizer of the simulated model
becomes a QuantizeLinear/DequantizeLinear pair with the quantizer's exact scale and zero point, every
quantized weight an integer initializer (the sim's own quantized weight, so the codes are the ones it
used) behind a DequantizeLinear, and everything the scheme leaves in float stays float: with the
reference schemes that is the embedding, the residual stream, the final norm and the lm_head
(``docs/reference.md#precision-table``), the scaling by 1/sqrt(d), the mask add and the softmax.

The KV cache is what the simulation does not model (§1.4). As the reference device graph does, it is
uint8 with one encoding for K and one for V shared by all layers (the union of the per-layer ``attn.k`` /
``attn.v`` ranges). The prefill graph attends with the per-layer encodings, exactly as the simulation, and
writes its K/V requantized to the shared ones; the decode graph attends over the cache, so its K and V
carry the shared encodings. That requantization is the cache's cost, measured in the tests.

Layouts: linear weights are stored transposed, ``(in, out)``, for ``MatMul``; per-output-channel scales
run along axis 1 of that layout. Tensor names follow the module paths of the transformers model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from ..quantizer import QSpec
from ..sim import ARCHS, arch_of, decoder_layers
from .graph import GraphBuilder

NEG = float(np.finfo(np.float32).min)  # the additive mask value transformers' eager mask uses


class ExportError(ValueError):
    """The model or scheme cannot be expressed as the deployable graph; the message names the part."""


@dataclass(frozen=True)
class KVEncoding:
    scale: float
    offset: float
    spec: QSpec = QSpec(8)

    def to_dict(self) -> dict:
        mn, mx = (self.spec.qmin - self.offset) * self.scale, (self.spec.qmax - self.offset) * self.scale
        return {"bitwidth": self.spec.bits, "dtype": "uint8", "symmetric": False, "scale": self.scale,
                "offset": self.offset, "aimet_offset": -self.offset, "min": mn, "max": mx}


def _active(q) -> bool:
    return q is not None and q.spec is not None and q.enabled and not q.observing


def _check_quantizer(q) -> None:
    if not _active(q):
        return
    if q.scale is None:
        raise ExportError(f"quantizer {q.name} has no range: calibrate or load encodings before exporting")
    if q.spec.bits == 4 and not q.name.endswith(".weight"):
        raise ExportError(f"{q.name} ({q.role}) is a 4-bit activation: QNN's HTP has no 4-bit activations, so "
                          f"the exporter does not write them; use 8 or 16 bits for role {q.role}")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def shared_kv_encodings(model) -> tuple[KVEncoding, KVEncoding] | None:
    """One uint8 encoding for K and one for V over all layers: the union of the per-layer ranges."""
    from ..quantizer import minmax_from_qparams, qparams_from_minmax

    out = []
    for short in ("k", "v"):
        lo, hi = [], []
        for layer in decoder_layers(model):
            q = getattr(getattr(layer.self_attn, "attn_quant", None), short, None)
            if not _active(q):
                return None
            mn, mx = minmax_from_qparams(q.scale, q.offset, q.spec)
            lo.append(float(mn.min()))
            hi.append(float(mx.max()))
        spec = QSpec(8)
        s, o = qparams_from_minmax(torch.tensor([min(lo)]), torch.tensor([max(hi)]), spec)
        out.append(KVEncoding(float(s), float(o), spec))
    return out[0], out[1]


class DecoderExporter:
    """Builds the prefill or decode graph of one simulated (or float) Llama / Gemma-3 model."""

    def __init__(self, model, *, prefill: int, ctx: int):
        self.model = model
        self.arch = arch_of(model)
        self.cfg = model.config
        self.mt = self.cfg.model_type
        self.prefill, self.ctx = prefill, ctx
        self.layers = decoder_layers(model)
        self.n_heads = self.cfg.num_attention_heads
        self.n_kv = self.cfg.num_key_value_heads
        self.head_dim = getattr(self.cfg, "head_dim", None) or self.cfg.hidden_size // self.n_heads
        self.hidden = self.cfg.hidden_size
        self.vocab = self.cfg.vocab_size
        self.gemma = self.arch is ARCHS["gemma3_text"]
        self.layer_types = list(getattr(self.cfg, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.window = getattr(self.cfg, "sliding_window", None)
        for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self.cfg, attr, None) is not None:
                raise ExportError(f"config.{attr} is set: soft-capping is not in the exported graph yet")
        for q in (m for m in model.modules() if hasattr(m, "spec") and hasattr(m, "observing")):
            _check_quantizer(q)
        self.kv = shared_kv_encodings(model)
        self._cache_dq: dict[str, str] = {}  # cache input -> its DequantizeLinear output, per graph

    # -- pieces --
    def _act(self, b: GraphBuilder, x: str, q) -> str:
        if not _active(q):
            return x
        return b.qdq(x, q.spec, _np(q.scale), _np(q.offset))

    @torch.no_grad()
    def _weight(self, b: GraphBuilder, name: str, module, transpose: bool) -> str:
        """The module's (quantized) weight as used by the simulation, ``(in, out)`` when ``transpose``."""
        q = getattr(module, "weight_quantizer", None)
        if not _active(q):
            w = module.base_weight() if hasattr(module, "base_weight") else module.weight
            w = _np(w)
            return b.initializer(name, np.ascontiguousarray(w.T if transpose else w))
        wq = module._quantized_weight().detach().float().cpu()
        s, o = q.scale.detach().float().cpu(), q.offset.detach().float().cpu()
        shape = (-1,) + (1,) * (wq.dim() - 1) if s.numel() > 1 else ()
        codes = torch.round(wq / s.reshape(shape)) + o.reshape(shape)
        codes = torch.clamp(codes, q.spec.qmin, q.spec.qmax).numpy().astype(np.int64)
        axis = None
        if q.spec.per_channel and s.numel() > 1:
            axis = 1 if transpose else 0
        if transpose:
            codes = codes.T
        return b.int_weight(name, np.ascontiguousarray(codes), q.spec, _np(s), _np(o), axis,
                            param_name=f"{name}")

    def _linear(self, b: GraphBuilder, x: str, lin, name: str, in_q=None) -> str:
        """``in_q``: the quantizer whose QDQ produced ``x`` when the linear has no input quantizer itself."""
        own = getattr(lin, "input_quantizer", None)
        x = self._act(b, x, own)
        in_q = own if _active(own) else in_q
        out_q, w_q = getattr(lin, "output_quantizer", None), getattr(lin, "weight_quantizer", None)
        if (_active(in_q) and _active(out_q) and _active(w_q) and in_q.spec.bits == 8 and out_q.spec.bits == 16
                and w_q.scale.numel() > 1):
            x = self._widen(b, x, in_q, name)
        w = self._weight(b, f"{name}.weight", lin, transpose=True)
        y = b.node("MatMul", [x, w], f"{name}.output")
        if lin.bias is not None:
            y = b.node("Add", [y, b.initializer(f"{name}.bias", _np(lin.bias))], f"{name}.output_bias")
        return self._act(b, y, getattr(lin, "output_quantizer", None))

    def _widen(self, b: GraphBuilder, x: str, q, name: str) -> str:
        """Re-express an 8-bit tensor on the 16-bit grid that contains it exactly: scale / 256 and zero point
        * 256 (256 * code lies in [0, 65280]), so no value moves. QNN's HTP takes a matmul with per-channel
        weights from 8-bit inputs to a 16-bit output only in this A16 form (the reference's device graph also
        runs down_proj's input at 16 bits, ``docs/reference.md#simulation-against-device``)."""
        from ..quantizer import QSpec as _QSpec

        wide = _QSpec(16, q.spec.symmetric)
        scale, offset = _np(q.scale) / 256.0, _np(q.offset) * 256.0
        # The 16-bit copy is a tensor of its own (an Identity), so the AIMET file keys its 16-bit encoding
        # by a name the float graph has: a converter reading the overrides sees a 16-bit input there.
        x16 = b.node("Identity", [x], f"{name}.input16")
        return b.qdq(x16, wide, scale, offset)

    def _rmsnorm(self, b: GraphBuilder, x: str, norm, name: str) -> str:
        """ONNX's RMSNormalization op (opset 23): ``x / sqrt(mean(x^2) + eps) * g``, eps kept exactly.

        It is what the simulation computes (``quant.sim.QNormMixin``, within float32 rounding), and
        onnxruntime's QNN provider maps its DQ -> RMSNormalization -> Q unit onto QNN's native RmsNorm,
        which the HTP runs on the integer input. The float-op forms run in fp16 on the NPU instead: the
        plain formula's ``x * x`` overflows at SmolLM2's massive activation (about 22,300 from layer 13),
        ``x / c`` scaling pushes the small channels into fp16 subnormals, and the HTP's L2 normalisation
        drops eps (``docs/deploy.md``, "The norm on the HTP").
        """
        iq = getattr(norm, "input_quantizer", None)
        x = self._act(b, x, iq)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        g = self._weight(b, f"{name}.weight", norm, transpose=False)
        if not hasattr(norm, "weight_quantizer") and self.gemma:  # a plain (float) Gemma norm: 1 + w
            g = b.node("Add", [g, b.const(1.0)], f"{name}.gain")
        y = b.node("RMSNormalization", [x, g], f"{name}.output", axis=-1, epsilon=eps)
        return self._act(b, y, getattr(norm, "output_quantizer", None))

    def _rope_tables(self, layer_type: str, positions: int) -> tuple[np.ndarray, np.ndarray]:
        rope = self.model.model.rotary_emb
        pos = torch.arange(positions, dtype=torch.long)[None]
        dummy = torch.zeros(1, dtype=torch.float32)
        kwargs = {"layer_type": layer_type} if "layer_type" in inspect.signature(rope.forward).parameters else {}
        with torch.no_grad():
            cos, sin = rope(dummy, pos, **kwargs)
        return _np(cos[0]), _np(sin[0])  # (positions, head_dim)

    def _rotate(self, b: GraphBuilder, x: str, cos: str, sin: str, name: str) -> str:
        half = self.head_dim // 2
        x1, x2 = b.nodes_multi("Split", [x, b.const([half, half], np.int64)], [f"{name}.x1", f"{name}.x2"], axis=-1)
        rot = b.node("Concat", [b.node("Neg", [x2], f"{name}.neg_x2"), x1], f"{name}.rotated", axis=-1)
        return b.node("Add", [b.node("Mul", [x, cos], f"{name}.x_cos"), b.node("Mul", [rot, sin], f"{name}.rot_sin")],
                      f"{name}.output")

    def _heads(self, b: GraphBuilder, x: str, n: int, t: int, name: str) -> str:
        r = b.node("Reshape", [x, b.const([1, t, n, self.head_dim], np.int64)], f"{name}.heads")
        return b.node("Transpose", [r], f"{name}.bhtd", perm=[0, 2, 1, 3])

    def _expand_kv(self, b: GraphBuilder, x: str, s: int, name: str) -> str:
        rep = self.n_heads // self.n_kv
        if rep == 1:
            return x
        u = b.node("Unsqueeze", [x, b.const([2], np.int64)], f"{name}.unsq")
        e = b.node("Expand", [u, b.const([1, self.n_kv, rep, s, self.head_dim], np.int64)], f"{name}.expanded")
        return b.node("Reshape", [e, b.const([1, self.n_heads, s, self.head_dim], np.int64)], f"{name}.repeated")

    # -- the graph --
    def build(self, mode: str) -> tuple[GraphBuilder, dict]:
        if mode not in ("prefill", "decode"):
            raise ValueError(f"mode must be prefill or decode, got {mode!r}")
        b = GraphBuilder(f"{self.mt}_{mode}")
        self._cache_dq = {}
        t = self.prefill if mode == "prefill" else 1
        ctx, L, hkv, d = self.ctx, len(self.layers), self.n_kv, self.head_dim
        io = {"inputs": [], "outputs": []}

        def inp(name, etype, shape):
            b.input(name, etype, shape)
            io["inputs"].append({"name": name, "shape": shape, "dtype": _dtype(etype)})

        inp("input_ids", TensorProto.INT64, [1, t])
        if mode == "decode":
            inp("position_ids", TensorProto.INT64, [1, 1])
            cache_type = TensorProto.UINT8 if self.kv is not None else TensorProto.FLOAT  # float model: float cache
            inp("k_cache", cache_type, [L, hkv, ctx, d])
            inp("v_cache", cache_type, [L, hkv, ctx, d])
            inp("attention_bias", TensorProto.FLOAT, [1, ctx + 1])
            if "sliding_attention" in self.layer_types:
                inp("sliding_attention_bias", TensorProto.FLOAT, [1, ctx + 1])

        emb = self.model.model.embed_tokens
        table = b.initializer("model.embed_tokens.weight", _np(emb.weight))
        h = b.node("Gather", [table, "input_ids"], "model.embed_tokens.output", axis=0)
        if self.gemma:
            scale = float(emb.embed_scale.to(emb.weight.dtype))
            h = b.node("Mul", [h, b.const(scale)], "model.embed_tokens.scaled")
        h = self._act(b, h, getattr(emb, "output_quantizer", None))  # the device table's 16-bit residual stream

        # position tables and masks, one per layer type
        cos_sin, masks = {}, {}
        for lt in sorted(set(self.layer_types)):
            if mode == "prefill":
                c, s = self._rope_tables(lt, t)
                cos_sin[lt] = (b.initializer(f"rope.{lt}.cos", c[None, None]), b.initializer(f"rope.{lt}.sin", s[None, None]))
                causal = np.triu(np.full((t, t), NEG, np.float32), 1)
                if lt == "sliding_attention" and self.window:
                    causal[np.tril_indices(t, -self.window)] = NEG
                masks[lt] = b.initializer(f"mask.{lt}", causal[None, None])
            else:
                c, s = self._rope_tables(lt, ctx + 1)
                ct, st = b.initializer(f"rope.{lt}.cos_table", c), b.initializer(f"rope.{lt}.sin_table", s)
                cos = b.node("Gather", [ct, "position_ids"], f"rope.{lt}.cos", axis=0)  # (1, 1, D)
                sin = b.node("Gather", [st, "position_ids"], f"rope.{lt}.sin", axis=0)
                cos_sin[lt] = (b.node("Unsqueeze", [cos, b.const([1], np.int64)], f"rope.{lt}.cos4"),
                               b.node("Unsqueeze", [sin, b.const([1], np.int64)], f"rope.{lt}.sin4"))
                bias = "sliding_attention_bias" if lt == "sliding_attention" else "attention_bias"
                masks[lt] = b.node("Reshape", [bias, b.const([1, 1, 1, ctx + 1], np.int64)], f"mask.{lt}")

        k_outs, v_outs = [], []
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}"
            lt = self.layer_types[i]
            attn = layer.self_attn
            aq = getattr(attn, "attn_quant", None)
            residual = h
            x = self._rmsnorm(b, h, layer.input_layernorm, f"{p}.input_layernorm")
            q = self._heads(b, self._linear(b, x, attn.q_proj, f"{p}.self_attn.q_proj"), self.n_heads, t, f"{p}.self_attn.q")
            k = self._heads(b, self._linear(b, x, attn.k_proj, f"{p}.self_attn.k_proj"), hkv, t, f"{p}.self_attn.k")
            v = self._heads(b, self._linear(b, x, attn.v_proj, f"{p}.self_attn.v_proj"), hkv, t, f"{p}.self_attn.v")
            if self.gemma:
                q = self._rmsnorm(b, q, attn.q_norm, f"{p}.self_attn.q_norm")
                k = self._rmsnorm(b, k, attn.k_norm, f"{p}.self_attn.k_norm")
            cos, sin = cos_sin[lt]
            q = self._rotate(b, q, cos, sin, f"{p}.self_attn.q_rope")
            k = self._rotate(b, k, cos, sin, f"{p}.self_attn.k_rope")
            q = self._act(b, q, aq.q if aq else None)
            if mode == "prefill":
                if self.kv is not None:
                    k_outs.append(b.quantize(k, QSpec(8), self.kv[0].scale, self.kv[0].offset, f"{p}.k_cache_out"))
                    v_outs.append(b.quantize(v, QSpec(8), self.kv[1].scale, self.kv[1].offset, f"{p}.v_cache_out"))
                else:
                    k_outs.append(k)
                    v_outs.append(v)
                k = self._act(b, k, aq.k if aq else None)
                v = self._act(b, v, aq.v if aq else None)
                s = t
            else:
                k, kq = self._cache(b, k, "k_cache", i, self.kv[0] if self.kv else None, p)
                v, vq = self._cache(b, v, "v_cache", i, self.kv[1] if self.kv else None, p)
                k_outs.append(kq)
                v_outs.append(vq)
                s = ctx + 1
            k = self._expand_kv(b, k, s, f"{p}.self_attn.k")
            v = self._expand_kv(b, v, s, f"{p}.self_attn.v")
            kt = b.node("Transpose", [k], f"{p}.self_attn.k_t", perm=[0, 1, 3, 2])
            scores = b.node("MatMul", [q, kt], f"{p}.self_attn.scores")
            scores = self._act(b, scores, aq.scores if aq else None)
            scaling = float(attn.scaling)
            scaled = b.node("Mul", [scores, b.const(scaling)], f"{p}.self_attn.scores_scaled")
            masked = b.node("Add", [scaled, masks[lt]], f"{p}.self_attn.scores_masked")
            probs = b.node("Softmax", [masked], f"{p}.self_attn.probs", axis=-1)
            probs = self._act(b, probs, aq.probs if aq else None)
            out = b.node("MatMul", [probs, v], f"{p}.self_attn.pv")
            out = self._act(b, out, aq.out if aq else None)
            out = b.node("Transpose", [out], f"{p}.self_attn.pv_bthd", perm=[0, 2, 1, 3])
            out = b.node("Reshape", [out, b.const([1, t, self.n_heads * d], np.int64)], f"{p}.self_attn.merged")
            a = self._linear(b, out, attn.o_proj, f"{p}.self_attn.o_proj", in_q=aq.out if aq else None)
            if self.gemma:
                a = self._rmsnorm(b, a, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
            rq = getattr(layer, "residual_quantizers", None)
            h = b.node("Add", [residual, a], f"{p}.attn_residual")
            h = self._act(b, h, rq["attn"] if rq is not None else None)
            residual = h
            ffn_norm = getattr(layer, self.arch["ffn_norm"])
            x = self._rmsnorm(b, h, ffn_norm, f"{p}.{self.arch['ffn_norm']}")
            m = self._mlp(b, x, layer.mlp, f"{p}.mlp")
            if self.gemma:
                m = self._rmsnorm(b, m, layer.post_feedforward_layernorm, f"{p}.post_feedforward_layernorm")
            h = b.node("Add", [residual, m], f"{p}.output")
            h = self._act(b, h, rq["out"] if rq is not None else None)

        h = self._rmsnorm(b, h, self.model.model.norm, "model.norm")
        head = self.model.lm_head
        if _active(getattr(head, "weight_quantizer", None)) or _active(getattr(head, "output_quantizer", None)):
            b.node("Identity", [self._linear(b, h, head, "lm_head")], "logits")  # its own integer weight
        else:
            h2 = b.node("Reshape", [h, b.const([t, self.hidden], np.int64)], "lm_head.input_2d")
            tied = head.weight.data_ptr() == emb.weight.data_ptr()
            w = table if tied else b.initializer("lm_head.weight", _np(head.weight))  # shared with the embedding
            logits = b.node("Gemm", [h2, w], "lm_head.output", transB=1)
            b.node("Reshape", [logits, b.const([1, t, self.vocab], np.int64)], "logits")
        outputs = [("logits", TensorProto.FLOAT, [1, t, self.vocab], None)]
        kv_shape = [L, hkv, t, d]
        if self.kv is None:
            for name, parts in (("k_out", k_outs), ("v_out", v_outs)):
                b.node("Concat", parts, name, axis=0)
                outputs.append((name, TensorProto.FLOAT, kv_shape, None))
        else:
            for name, parts, enc in (("k_out", k_outs, self.kv[0]), ("v_out", v_outs, self.kv[1])):
                enc_ = self.kv[0] if name == "k_out" else self.kv[1]
                # QNN takes a quantized Concat only as a DQ -> Concat -> Q unit; one encoding, so lossless
                deq = [b.dequantize(q_, enc_.spec, enc_.scale, enc_.offset, f"{q_}.to_{name}") for q_ in parts]
                cat = b.node("Concat", deq, f"{name}.float", axis=0)
                b.quantize(cat, enc_.spec, enc_.scale, enc_.offset, name)
                outputs.append((name, TensorProto.UINT8, kv_shape, enc.to_dict()))
        for name, etype, shape, enc in outputs:
            b.output(name, etype, shape)
            io["outputs"].append({"name": name, "shape": shape, "dtype": _dtype(etype), **({"encoding": enc} if enc else {})})
        return b, io

    def _cache(self, b: GraphBuilder, x: str, cache: str, i: int, enc: KVEncoding | None, p: str) -> tuple[str, str]:
        """Append this step's K or V (quantized to the shared encoding) to layer ``i``'s cache slice."""
        kind = cache[0]
        if enc is None:  # a float model's float cache
            past = b.node("Gather", [cache, b.const([i], np.int64)], f"{p}.{kind}_cache_past", axis=0)
            full = b.node("Concat", [past, x], f"{p}.{kind}_cache_full", axis=2)
            return full, x
        sp, sc, of = enc.spec, enc.scale, enc.offset
        # Every op on the uint8 cache is a DQ -> op -> Q unit (the form QNN maps to quantized ops); all
        # carry the one shared encoding, so the repeated QDQ is lossless.
        new_q = b.quantize(x, sp, sc, of, f"{p}.{kind}_cache_out")  # (1, Hkv, 1, D) uint8
        if cache not in self._cache_dq:
            self._cache_dq[cache] = b.dequantize(cache, sp, sc, of, f"{cache}.dq")
        past = b.node("Gather", [self._cache_dq[cache], b.const([i], np.int64)], f"{p}.{kind}_cache_past", axis=0)
        past = b.dequantize(b.quantize(past, sp, sc, of, f"{p}.{kind}_cache_past.q"), sp, sc, of, f"{p}.{kind}_cache_past.dq")
        new = b.dequantize(new_q, sp, sc, of, f"{p}.{kind}_cache_out.dq")
        full = b.node("Concat", [past, new], f"{p}.{kind}_cache_full", axis=2)  # (1, Hkv, ctx + 1, D)
        deq = b.dequantize(b.quantize(full, sp, sc, of, f"{p}.{kind}_cache_full.q"), sp, sc, of,
                           f"{p}.self_attn.{kind}_from_cache")
        return deq, new_q

    def _mlp(self, b: GraphBuilder, x: str, mlp, name: str) -> str:
        gate = self._linear(b, x, mlp.gate_proj, f"{name}.gate_proj")
        up = self._linear(b, x, mlp.up_proj, f"{name}.up_proj")
        act = mlp.act_fn
        sig_q = getattr(act, "sigmoid_quantizer", None)
        if self.gemma:
            y = b.node("Gelu", [gate], f"{name}.act_fn.gelu", approximate="tanh")
        else:
            sig = b.node("Sigmoid", [gate], f"{name}.act_fn.sigmoid")
            sig = self._act(b, sig, sig_q)
            y = b.node("Mul", [gate, sig], f"{name}.act_fn.silu")
        y = self._act(b, y, getattr(act, "output_quantizer", None))
        prod = b.node("Mul", [y, up], f"{name}.down_proj.input")
        return self._linear(b, prod, mlp.down_proj, f"{name}.down_proj")


def _dtype(etype: int) -> str:
    from .graph import NP_NAMES

    return NP_NAMES[etype]
