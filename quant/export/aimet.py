"""Encodings in AIMET's JSON format, keyed by the exported graph's tensor names.

This is the legacy (``"version": "0.6.1"``) layout that ``qnn-onnx-converter --quantization_overrides``
and AI Hub's ``.aimet`` model folders read, and that AIMET's own ``load_encodings_to_sim`` accepts::

    {"version": "0.6.1",
     "activation_encodings": {"<tensor>": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False",
                                             "min": .., "max": .., "scale": .., "offset": -zp}]},
     "param_encodings":      {"<weight>": [one entry per output channel, or one]},
     "excluded_layers": [], "quantizer_args": {...}}

AIMET's ``offset`` is the negated zero point (``min = offset * scale``): ``aimet_offset`` in our artifact.
Keys are the float tensors that the QDQ pairs quantize: activations by the tensor entering
QuantizeLinear, weights by the DequantizeLinear output, which is the float weight once QDQ is folded.
"""

from __future__ import annotations

import numpy as np

AIMET_VERSION = "0.6.1"


def _entry(spec, scale: float, offset: float) -> dict:
    mn, mx = (spec.qmin - offset) * scale, (spec.qmax - offset) * scale
    if spec.symmetric:  # AIMET's signed encodings: offset = -2^(b-1) on the unsigned grid
        aimet_offset = float(spec.qmin)
    else:
        aimet_offset = -float(offset)
    return {"bitwidth": spec.bits, "dtype": "int", "is_symmetric": "True" if spec.symmetric else "False",
            "min": float(mn), "max": float(mx), "scale": float(scale), "offset": int(round(aimet_offset))}


def _unrecorded_activations(graph, known: set) -> dict:
    """Entries for the QuantizeLinear nodes of ``graph`` whose float input has none yet.

    The builder records a site only for a Q -> DQ pair; the decode graph's cache re-quantizations (this
    step's K/V, the Gather of the past cache, the Concat of both) are bare QuantizeLinear nodes, so without
    this their tensors had no entry and AIMET's strict loader refused the decode file. A Q that produces a
    graph output is skipped (the cache outputs are keyed by the output's name), and so is a tensor that
    already has an entry (the prefill's cache Q shares its input with the attention's QDQ; ``k_out`` and
    ``v_out`` carry the cache encoding).
    """
    from onnx import numpy_helper

    from ..quantizer import QSpec

    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    signed_bits = {2: (False, 8), 3: (True, 8), 4: (False, 16), 5: (True, 16), 21: (False, 4), 22: (True, 4)}
    out = {}
    for n in graph.node:
        x = n.input[0] if n.op_type == "QuantizeLinear" else None
        if x is None or x in known or x in out or n.output[0] in outputs:
            continue
        zp = inits[n.input[2]]
        signed, bits = signed_bits[zp.data_type]
        scale, offset = numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(zp)
        out[x] = [_entry(QSpec(bits, symmetric=signed), float(scale), float(offset))]
    return out


def _holds(outer: dict, inner: dict) -> bool:
    """Whether ``outer``'s grid contains every code value of ``inner``'s (same min, scale an integer fraction)."""
    k = inner["scale"] / outer["scale"]
    tol = 1e-6 * inner["scale"]
    return (round(k) >= 1 and abs(k - round(k)) <= 1e-6 * k and abs(outer["min"] - inner["min"]) <= tol
            and outer["max"] >= inner["max"] - tol)


def _drop_lossless_restacks(graph, acts: dict) -> None:
    """Remove entries keyed by a DequantizeLinear output that re-quantizes an already quantized tensor.

    The device table stacks QDQ pairs: the residual's 16-bit QDQ, then the norm's own with the same
    encoding; an 8-bit tensor re-gridded to 16 bits for an HTP matmul (scale / 256, offset * 256). A float
    graph (what AIMET, ``qnn-onnx-converter --quantization_overrides`` and AI Hub key by) has no tensor of
    that name, and AIMET refuses the whole file over it. When the second grid holds every value of the
    first, the re-quantization changes nothing and the entry is dropped; any other is left for the
    loader to report.
    """
    producers = {o: n for n in graph.node for o in n.output}

    def base(name: str) -> str | None:
        dq = producers.get(name)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None

    for name in [n for n in acts if base(n) is not None]:
        b = base(name)
        while b not in acts and base(b) is not None:
            b = base(b)
        if b in acts and len(acts[b]) == len(acts[name]) == 1 and _holds(acts[name][0], acts[b][0]):
            del acts[name]


def encodings(sites: dict, extra_activations: dict | None = None, graph=None) -> dict:
    """``sites``: the builder's ``qdq_sites`` (name -> spec, scale, offset[, param, per_channel]);
    ``graph``: the ONNX graph, whose QuantizeLinear nodes outside ``sites`` also get entries."""
    acts, params = {}, {}
    for name, site in sites.items():
        spec, scale, offset = site["spec"], np.atleast_1d(site["scale"]), np.atleast_1d(site["offset"])
        offset = np.broadcast_to(offset, scale.shape)
        entries = [_entry(spec, float(s), float(o)) for s, o in zip(scale, offset)]
        (params if "param" in site else acts)[name] = entries
    for name, entry in (extra_activations or {}).items():
        acts[name] = [entry]
    if graph is not None:
        acts.update(_unrecorded_activations(graph, set(acts) | set(params)))
        _drop_lossless_restacks(graph, acts)
    return {"version": AIMET_VERSION, "activation_encodings": acts, "param_encodings": params,
            "excluded_layers": [],
            "quantizer_args": {"activation_bitwidth": 8, "dtype": "int", "is_symmetric": False,
                               "param_bitwidth": 8, "per_channel_quantization": True,
                               "quant_scheme": "post_training_tf"}}


def kv_entry(enc) -> dict:
    """The shared KV-cache encoding (``decoder.KVEncoding``) as an AIMET activation entry."""
    return _entry(enc.spec, enc.scale, enc.offset)
