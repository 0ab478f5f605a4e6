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


def encodings(sites: dict, extra_activations: dict | None = None) -> dict:
    """``sites``: the builder's ``qdq_sites`` (name -> spec, scale, offset[, param, per_channel])."""
    acts, params = {}, {}
    for name, site in sites.items():
        spec, scale, offset = site["spec"], np.atleast_1d(site["scale"]), np.atleast_1d(site["offset"])
        offset = np.broadcast_to(offset, scale.shape)
        entries = [_entry(spec, float(s), float(o)) for s, o in zip(scale, offset)]
        (params if "param" in site else acts)[name] = entries
    for name, entry in (extra_activations or {}).items():
        acts[name] = [entry]
    return {"version": AIMET_VERSION, "activation_encodings": acts, "param_encodings": params,
            "excluded_layers": [],
            "quantizer_args": {"activation_bitwidth": 8, "dtype": "int", "is_symmetric": False,
                               "param_bitwidth": 8, "per_channel_quantization": True,
                               "quant_scheme": "post_training_tf"}}


def kv_entry(enc) -> dict:
    """The shared KV-cache encoding (``decoder.KVEncoding``) as an AIMET activation entry."""
    return _entry(enc.spec, enc.scale, enc.offset)
