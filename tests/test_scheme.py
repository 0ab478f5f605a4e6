import pytest

from quant.quantizer import QSpec
from quant.scheme import ACT_ROLES, MODEL_ROLES, ROLES, SCHEMES, WEIGHT_ROLES, Scheme, get_scheme


def test_reference_w8a8_table():
    s = get_scheme("w8a8")
    assert s.spec("qkv.weight") == QSpec(8) and s.spec("o.weight") == QSpec(8)
    assert s.spec("down.weight") == QSpec(8, per_channel=True)  # the reference forces per-channel down_proj
    for role in ("norm.in", "attn.scores", "attn.probs", "o.out", "down.out"):
        assert s.spec(role).bits == 16, role
    for role in ("norm.out", "qkv.out", "attn.q", "attn.k", "attn.v", "attn.out", "gate_up.out", "down.in"):
        assert s.spec(role) == QSpec(8), role


def test_w4a8_and_w8a16():
    w4 = get_scheme("w4a8")
    assert all(w4.spec(r) == QSpec(4, per_channel=True) for r in ("qkv.weight", "o.weight", "gate_up.weight"))
    w8a16 = get_scheme("w8a16")
    assert all(w8a16.spec(r).bits == 16 for r in ACT_ROLES if r not in MODEL_ROLES)
    assert all(w8a16.spec(r) is None for r in MODEL_ROLES)  # float, as in the reference simulation
    assert w8a16.spec("qkv.weight") == QSpec(8, symmetric=True, per_channel=True)
    assert SCHEMES["fp"].is_float and not w4.is_float


def test_generic_and_bad_schemes():
    s = get_scheme("w4a16-sym")
    assert s.spec("qkv.weight") == QSpec(4, True, True) and s.spec("qkv.out") == QSpec(16)
    with pytest.raises(ValueError, match="weight bits must be one of"):
        get_scheme("w6a8")
    with pytest.raises(ValueError, match="activation bits must be one of"):
        get_scheme("w8a12")
    with pytest.raises(ValueError, match="unknown scheme 'int8'"):
        get_scheme("int8")
    with pytest.raises(ValueError, match="unknown roles"):
        Scheme("bad", {"resid": QSpec(8)})


def test_round_trip_every_scheme():
    for s in SCHEMES.values():
        assert Scheme.from_dict(s.to_dict()) == s
    assert set(WEIGHT_ROLES) | set(ACT_ROLES) == set(ROLES)


def test_role_overrides():
    s = get_scheme("w8a8:down.in=16,gate_up.out=fp,o.weight=4")
    base = get_scheme("w8a8")
    assert s.spec("down.in") == QSpec(16) and s.spec("gate_up.out") is None
    assert s.spec("o.weight") == QSpec(4)  # keeps the base role's per-tensor asymmetric layout
    assert get_scheme("w4a8-sym:qkv.weight=8").spec("qkv.weight") == QSpec(8, True, True)
    assert all(s.spec(r) == base.spec(r) for r in ROLES if r not in ("down.in", "gate_up.out", "o.weight"))
    assert Scheme.from_dict(s.to_dict()) == s  # an artifact's recipe reloads it
    with pytest.raises(ValueError, match="'resid=16' is not ROLE=BITS with a known role, or 'device'"):
        get_scheme("w8a8:resid=16")
    with pytest.raises(ValueError, match="down.in bits must be one of"):
        get_scheme("w8a8:down.in=12")
    with pytest.raises(ValueError, match="unknown scheme 'w8x8'"):
        get_scheme("w8x8:down.in=16")


def test_device_override_is_the_phone_table():
    """``:device`` (docs/reference.md#simulation-against-device): the model-level roles the reference
    simulation leaves in float become 16-bit (8-bit per-channel symmetric lm_head), per-channel weights become symmetric; the rest of
    the scheme is untouched, and it combines with other overrides in order."""
    base, dev = get_scheme("w8a8"), get_scheme("w8a8:device")
    assert all(base.spec(r) is None for r in MODEL_ROLES)  # the reference simulation: float
    assert {r: dev.spec(r) for r in MODEL_ROLES} == {
        "embed.out": QSpec(16), "residual": QSpec(16), "final_norm.in": QSpec(16), "final_norm.weight": QSpec(16),
        "final_norm.out": QSpec(16), "lm_head.weight": QSpec(8, True, True), "lm_head.out": QSpec(16)}
    assert dev.spec("down.weight") == QSpec(8, True, True)  # was per-channel asymmetric
    assert dev.spec("qkv.weight") == QSpec(8)  # per-tensor asymmetric is deployable as is
    # what the HTP runs at 16 bits: the norm's output (its RmsNorm writes its input's width) and the input
    # of a per-channel matmul with a 16-bit output (down_proj; o_proj too where its weights are per-channel)
    widened = {"norm.out": QSpec(16), "down.in": QSpec(16)}
    assert {r: dev.spec(r) for r in widened} == widened
    assert all(dev.spec(r) == base.spec(r) for r in ROLES
               if r not in MODEL_ROLES and r not in widened and r != "down.weight")
    w4 = get_scheme("w4a8:device")
    assert w4.spec("gate_up.weight") == QSpec(4, True, True)
    assert (w4.spec("attn.out"), w4.spec("down.in"), w4.spec("norm.out")) == (QSpec(16),) * 3
    assert w4.spec("act.out") == QSpec(8) and w4.spec("qkv.out") == QSpec(8)  # the rest stays at 8 bits
    assert dev.spec("attn.out") == QSpec(8)  # W8A8's o_proj weights are per-tensor: taken from 8 bits
    assert get_scheme("w8a8:device,down.in=8").spec("down.in") == QSpec(8)  # later overrides still win
    assert get_scheme("w8a8:device,residual=fp").spec("residual") is None
    assert Scheme.from_dict(dev.to_dict()) == dev
