"""Quantization schemes as data: a table from tensor role to :class:`QSpec` (or ``None`` = float).

The roles follow the reference precision table (`docs/reference.md#precision-table`). Per decoder layer:

==================  =======================================================================
role                tensor
==================  =======================================================================
norm.in             input of a norm that feeds linears (input_layernorm, the MLP's pre-norm)
norm.weight         that norm's effective gain (Gemma's ``1 + w``)
norm.out            that norm's output = the q/k/v or gate/up input
post_norm.weight    Gemma-3's post-attention / post-feedforward norm gains (residual side)
qk_norm.weight      Gemma-3's per-head q/k norm gains
qkv.weight          q/k/v projection weights
qkv.out             q/k/v projection outputs (before RoPE)
attn.q / attn.k     QK^T matmul inputs (after RoPE)
attn.scores         raw QK^T output, before the 1/sqrt(d) scale and the mask
attn.probs          softmax probabilities (PV matmul input 1)
attn.v              PV matmul input 2
attn.out            PV output = o_proj input
o.weight / o.out    o_proj
gate_up.weight      gate and up projection weights
gate_up.out         their outputs
act.sigmoid         SiLU's sigmoid branch (Llama)
act.out             activation output (SiLU product or GELU)
down.in             down_proj input = act(gate) * up
down.weight         down_proj weight
down.out            down_proj output
------------------  ----------------- model-level roles (float in the reference simulation) --------
embed.out           the embedding output, where the residual stream starts
residual            both residual adds of every layer (the residual stream)
final_norm.in/.weight/.out   the final norm
lm_head.weight / lm_head.out the output projection and the logits
==================  =======================================================================

Residual stream, embedding, final norm and lm_head stay float in the reference schemes, as in the
reference simulation. The phone runs them quantized (``docs/reference.md#simulation-against-device``):
the ``device`` override,
``w8a8:device`` (any scheme can take it, alone or with other overrides), sets the model-level roles to the
device table, 16-bit activations and an 8-bit per-channel symmetric lm_head, and makes per-channel weights
symmetric, the only per-channel form the HTP takes (the reference realizes W8A8's down_proj as "SLinear",
per-row abs-max scaling, for the same reason). Same simulator, more quantizers: not another code path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .quantizer import ALLOWED_BITS, QSpec

ROLES = (
    "norm.in", "norm.weight", "norm.out", "post_norm.weight", "qk_norm.weight",
    "qkv.weight", "qkv.out",
    "attn.q", "attn.k", "attn.scores", "attn.probs", "attn.v", "attn.out",
    "o.weight", "o.out",
    "gate_up.weight", "gate_up.out", "act.sigmoid", "act.out",
    "down.in", "down.weight", "down.out",
    "embed.out", "residual", "final_norm.in", "final_norm.weight", "final_norm.out", "lm_head.weight", "lm_head.out",
)
MODEL_ROLES = ("embed.out", "residual", "final_norm.in", "final_norm.weight", "final_norm.out",
               "lm_head.weight", "lm_head.out")
LAYER_ROLES = tuple(r for r in ROLES if r not in MODEL_ROLES)
WEIGHT_ROLES = tuple(r for r in ROLES if r.endswith(".weight"))
ACT_ROLES = tuple(r for r in ROLES if not r.endswith(".weight"))


@dataclass(frozen=True)
class Scheme:
    name: str
    table: dict = field(default_factory=dict)  # role -> QSpec | None
    description: str = ""

    def __post_init__(self):
        unknown = set(self.table) - set(ROLES)
        if unknown:
            raise ValueError(f"scheme {self.name!r}: unknown roles {sorted(unknown)}; known: {list(ROLES)}")

    def spec(self, role: str) -> QSpec | None:
        if role not in ROLES:
            raise KeyError(f"unknown role {role!r}")
        return self.table.get(role)

    @property
    def is_float(self) -> bool:
        return all(v is None for v in self.table.values())

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "table": {r: (s.to_dict() if s else None) for r, s in self.table.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        table = {r: (QSpec.from_dict(s) if s else None) for r, s in d["table"].items()}
        return cls(name=d["name"], table=table, description=d.get("description", ""))


def _reference_table(weight: QSpec, down_weight: QSpec, act_bits: int) -> dict:
    a = QSpec(act_bits)
    a16 = QSpec(16)
    w16 = QSpec(16)
    return {
        "norm.in": a16, "norm.weight": w16, "norm.out": a,
        "post_norm.weight": w16, "qk_norm.weight": w16,
        "qkv.weight": weight, "qkv.out": a,
        "attn.q": a, "attn.k": a, "attn.scores": a16, "attn.probs": a16, "attn.v": a, "attn.out": a,
        "o.weight": weight, "o.out": a16,
        "gate_up.weight": weight, "gate_up.out": a, "act.sigmoid": a, "act.out": a,
        "down.in": a, "down.weight": down_weight, "down.out": a16,
    }


def uniform_scheme(name: str, bits: int | None, symmetric: bool = False) -> Scheme:
    """Every decoder-layer role at the same precision (``bits=None``: the float model); used by equivalence
    tests. The model-level roles stay float, as in the reference schemes."""
    spec = QSpec(bits, symmetric=symmetric) if bits else None
    return Scheme(name, {r: spec for r in LAYER_ROLES}, f"every site at {bits or 'float'} bits")


SCHEMES: dict[str, Scheme] = {
    "fp": Scheme("fp", {r: None for r in LAYER_ROLES}, "float reference: no quantizer"),
    # Today's on-device default: 8-bit per-channel symmetric weights (what QNN's per-channel/per-row
    # path takes), 16-bit activations everywhere the reference would use 8.
    "w8a16": Scheme("w8a16", _reference_table(QSpec(8, True, True), QSpec(8, True, True), 16),
                    "W8 per-channel symmetric, A16 static per-tensor"),
    "w8a8": Scheme("w8a8", _reference_table(QSpec(8), QSpec(8, per_channel=True), 8),
                   "W8 per-tensor asymmetric (down_proj per-channel), A8 static per-tensor, 16-bit exceptions"),
    "w4a8": Scheme("w4a8", _reference_table(QSpec(4, per_channel=True), QSpec(4, per_channel=True), 8),
                   "W4 per-channel asymmetric, A8 static per-tensor, 16-bit exceptions"),
    "w4a8-sym": Scheme("w4a8-sym", _reference_table(QSpec(4, True, True), QSpec(4, True, True), 8),
                       "W4 per-channel symmetric (the variant QNN deploys), A8 static per-tensor"),
}


_PATTERN = re.compile(r"^w(\d+)a(\d+)(-sym)?$")


DEVICE_OVERRIDE = "device"


def device_table(table: dict) -> dict:
    """``table`` as the phone runs it (``docs/reference.md#simulation-against-device``): 16-bit embedding
    output, residual stream, final norm and logits, an 8-bit per-channel symmetric lm_head, per-channel weights made symmetric."""
    out = dict(table)
    a16 = QSpec(16)
    out.update({"embed.out": a16, "residual": a16, "final_norm.in": a16, "final_norm.weight": QSpec(16),
                "final_norm.out": a16, "lm_head.weight": QSpec(8, True, True), "lm_head.out": a16})
    for role, spec in table.items():
        if spec is not None and role.endswith(".weight") and spec.per_channel and not spec.symmetric:
            out[role] = QSpec(spec.bits, True, True)
    # The HTP's RmsNorm writes its input's width: a 16-bit norm with an 8-bit output does not compile in
    # front of a matmul (QNN_COMMON_ERROR_MEM_ALLOC at finalize), and the 16 -> 8 requantization the HTP
    # does take moves 15% of the codes up by one (docs/deploy.md). So the norm's output, and the matmul
    # inputs it feeds, run at 16 bits on the phone.
    if out.get("norm.in") is not None and out["norm.in"].bits == 16 and out.get("norm.out") is not None:
        out["norm.out"] = QSpec(16, out["norm.out"].symmetric, out["norm.out"].per_channel)
    # The HTP runs a matmul with per-channel weights and a 16-bit output only from a 16-bit input (an
    # 8-bit one is refused), so the compiled graph reads those inputs at 16 bits: simulate 16 bits there
    # rather than an 8-bit rounding the phone never does.
    for inp, weight, output in WIDE_INPUT_MATMULS:
        w, o, i = out.get(weight), out.get(output), out.get(inp)
        if w is not None and w.per_channel and o is not None and o.bits == 16 and i is not None and i.bits < 16:
            out[inp] = QSpec(16, i.symmetric, i.per_channel)
    return out


# (input role, weight role, output role) of the matmuls whose input the HTP widens: down_proj, o_proj
WIDE_INPUT_MATMULS = (("down.in", "down.weight", "down.out"), ("attn.out", "o.weight", "o.out"))



def _with_overrides(base: Scheme, name: str, overrides: str) -> Scheme:
    """``role=bits`` pairs (bits 4, 8, 16 or ``fp``) on top of ``base``; a role keeps its symmetry and
    granularity, a role that was float gets the default (asymmetric, per-tensor) spec. The item ``device``
    applies :func:`device_table` at its place in the list."""
    table = dict(base.table)
    for item in overrides.split(","):
        if item.strip() == DEVICE_OVERRIDE:
            table = device_table(table)
            continue
        role, eq, value = item.strip().partition("=")
        if not eq or role not in ROLES:
            raise ValueError(f"scheme {name!r}: {item.strip()!r} is not ROLE=BITS with a known role, or "
                             f"'{DEVICE_OVERRIDE}'; roles: {', '.join(ROLES)}")
        if value == "fp":
            table[role] = None
            continue
        if value not in ("4", "8", "16"):
            raise ValueError(f"scheme {name!r}: {role} bits must be one of {ALLOWED_BITS} or fp, got {value!r}")
        old = table.get(role)
        table[role] = QSpec(int(value), old.symmetric, old.per_channel) if old else QSpec(int(value))
    return Scheme(name, table, f"{base.description}; overrides: {overrides}")


def get_scheme(name: str | Scheme) -> Scheme:
    """A named scheme, or a generic ``w<bits>a<bits>[-sym]`` in the reference layout, optionally followed by
    role overrides: ``w8a8:down.in=16,gate_up.out=16`` keeps those tensors at 16 bits (``=fp``: float).

    Generic schemes use per-tensor weights at 8+ bits (down_proj per-channel, as the reference) and
    per-channel weights below 8 bits; ``-sym`` makes the weights symmetric.
    """
    if isinstance(name, Scheme):
        return name
    base, colon, overrides = str(name).partition(":")
    if colon:
        return _with_overrides(get_scheme(base), str(name), overrides)
    if name in SCHEMES:
        return SCHEMES[name]
    m = _PATTERN.match(str(name))
    if not m:
        raise ValueError(f"unknown scheme {name!r}; available: {', '.join(SCHEMES)} or w<bits>a<bits>[-sym]")
    wb, ab, sym = int(m.group(1)), int(m.group(2)), bool(m.group(3))
    for what, bits in (("weight", wb), ("activation", ab)):
        if bits not in ALLOWED_BITS:
            raise ValueError(f"scheme {name!r}: {what} bits must be one of {ALLOWED_BITS}, got {bits}")
    weight = QSpec(wb, sym, per_channel=wb < 8)
    return Scheme(name, _reference_table(weight, QSpec(wb, sym, per_channel=True), ab),
                  f"W{wb} {'per-channel' if wb < 8 else 'per-tensor'} {'symmetric' if sym else 'asymmetric'}, A{ab}")
