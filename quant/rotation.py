"""Orthogonal rotations folded into the float weights (QuaRot; SpinQuant's R1 and R2 without learning).

An orthogonal ``Q`` leaves an RMSNorm of unit gain unchanged (``norm(x Q) = norm(x) Q``: the mean square
is rotation-invariant), so once every norm's gain has been folded into the linears that read it, the
whole residual stream can run in a rotated basis at no cost on the device:

====================  ====================================================  =========================
rotation              folded into                                           exact when
====================  ====================================================  =========================
R1 (residual, d x d)  embedding rows ``E Q``; q/k/v, gate/up, lm_head       every norm on the residual
                      columns ``W Q``; o_proj, down_proj rows ``Q^T W``     side is a pre-norm (Llama)
R2 (per head, D x D)  v_proj rows of each kv head ``R^T W_v``; o_proj         always (PV is linear in V)
                      columns of every query head ``W_o R``
====================  ====================================================  =========================

Gemma-3 is *not* exactly R1-rotatable: its sandwich norms (``post_attention_layernorm``,
``post_feedforward_layernorm``) normalise the sublayer's output and multiply by a per-channel gain *after*
the normalisation, right before the residual add, so the residual would need ``(y / rms(y) * g) Q``, and
``(y Q / rms(y)) * g`` is not that unless ``g`` is constant. There is no linear after those gains to fold
them into: doing it would add a d x d MatMul per post-norm on the device. Gemma-3 therefore gets R2 only
(``r1=None`` means "wherever exact"); ``tests/test_rotation.py`` shows both the inexactness of R1 on
Gemma-3 and that the post-norm gains are its only cause.

Folding the final norm's gain into lm_head makes lm_head differ from the embedding: a tied model is
untied (``config.tie_word_embeddings = False``). That costs one more vocab x d matrix in memory: 28.3M
parameters for SmolLM2-135M (113 MB in float32, 28 MB as the device's 8-bit lm_head).

Matrices:

* ``random``: Haar-random orthogonal (QR of a Gaussian matrix with the sign fix), seeded.
* ``hadamard``: a randomised Hadamard matrix ``H diag(±1) / sqrt(n)``. ``H`` is a true Hadamard matrix
  built as a Kronecker product of Sylvester (powers of 2) and Paley-I (order ``q + 1`` for a prime
  ``q = 3 mod 4``) factors, smallest Paley orders first: 576 = Paley4 x Paley12 x Paley12, 640 =
  Paley4 x Paley4 x Paley20 x H2; 64 and 256 are Sylvester. Where no such
  factorisation exists the largest power-of-2 Sylvester factor is combined (Kronecker) with a random
  orthogonal factor; ``info["construction"]`` records which one was used.

All products are computed in float64 and stored in the model's dtype, so the rotated float32 model
matches the original to float32 rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .sim import arch_of, decoder_layers

KINDS = ("none", "random", "hadamard")


class RotationError(ValueError):
    """A rotation was asked for that cannot be folded exactly into this model."""


@dataclass(frozen=True)
class RotationConfig:
    kind: str = "none"        # none | random | hadamard
    seed: int = 0
    r1: bool | None = None    # the residual rotation; None: wherever it is exact (Llama yes, Gemma-3 no)
    r2: bool = True           # the per-head V/O rotation (exact on every supported architecture)

    def check(self) -> None:
        if self.kind not in KINDS:
            raise RotationError(f"rotate must be one of {', '.join(KINDS)}, got {self.kind!r}")


def config_of(rotate) -> RotationConfig:
    """``rotate`` as given to :func:`quant.quantize`: None, a kind name, a dict or a RotationConfig."""
    if rotate is None:
        cfg = RotationConfig()
    elif isinstance(rotate, RotationConfig):
        cfg = rotate
    elif isinstance(rotate, str):
        cfg = RotationConfig(kind=rotate)
    elif isinstance(rotate, dict):
        unknown = sorted(set(rotate) - set(RotationConfig.__dataclass_fields__))
        if unknown:
            raise RotationError(f"rotate: unknown field(s) {unknown}; known: kind, seed, r1, r2")
        cfg = RotationConfig(**rotate)
    else:
        raise RotationError(f"rotate must be a kind name, a dict or a RotationConfig, got {type(rotate).__name__}")
    cfg.check()
    return cfg


# -- matrices ---------------------------------------------------------------------------------------


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal n x n (float64)."""
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley1(q: int) -> torch.Tensor:
    """Paley's first construction: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if x in residues else -1.0 for x in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]  # Jacobsthal matrix Q[i, j] = chi(j - i)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def _factors(n: int) -> list[tuple[str, int]] | None:
    """Hadamard factors (kind, order) whose Kronecker product has order n, or None."""
    if n == 1:
        return []
    if n & (n - 1) == 0:
        return [("sylvester", n)]
    for m in range(4, n + 1, 4):  # Paley-I orders are multiples of 4
        if n % m == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            rest = _factors(n // m)
            if rest is not None:
                return [("paley", m)] + rest
    return None


def hadamard(n: int) -> tuple[torch.Tensor | None, str]:
    """A ±1 Hadamard matrix of order n (H H^T = n I) and how it was built, or (None, reason)."""
    fac = _factors(n)
    if fac is None:
        return None, f"no Sylvester/Paley-I factorisation of {n}"
    h = torch.ones(1, 1, dtype=torch.float64)
    for kind, m in fac:
        h = torch.kron(h, _sylvester(m) if kind == "sylvester" else _paley1(m - 1))
    return h, " x ".join(f"{'H' if k == 'sylvester' else 'Paley'}{m}" for k, m in fac) or "1"


def randomized_hadamard(n: int, gen: torch.Generator) -> tuple[torch.Tensor, str]:
    h, how = hadamard(n)
    if h is None:
        p2 = n & -n  # the largest power of 2 dividing n
        h = torch.kron(_sylvester(p2), random_orthogonal(n // p2, gen) * (n // p2) ** 0.5)
        how = f"H{p2} x random-orthogonal{n // p2}"
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return h * signs.unsqueeze(0) / n**0.5, f"{how}, random signs"


def orthogonal(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, str]:
    if kind == "random":
        return random_orthogonal(n, gen), f"random-orthogonal{n}"
    if kind == "hadamard":
        return randomized_hadamard(n, gen)
    raise RotationError(f"no matrix for rotation kind {kind!r}")


# -- folding ----------------------------------------------------------------------------------------


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.data.copy_(value.to(p.dtype))


def _norm_gain(norm: nn.Module, unit_offset: bool) -> torch.Tensor:
    w = norm.weight.detach().double()
    return 1.0 + w if unit_offset else w


def _set_unit_gain(norm: nn.Module, unit_offset: bool) -> None:
    norm.weight.data.fill_(0.0 if unit_offset else 1.0)


@torch.no_grad()
def _fold_gain(norm: nn.Module, readers: list[nn.Linear], unit_offset: bool) -> None:
    g = _norm_gain(norm, unit_offset)
    for lin in readers:
        _set(lin.weight, lin.weight.detach().double() * g.unsqueeze(0))
    _set_unit_gain(norm, unit_offset)


def untie(model: nn.Module) -> bool:
    """Give lm_head its own weight if it shares the embedding's; True if it did."""
    head, emb = model.lm_head, model.get_input_embeddings()
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, _text_config(model.config))}.values():
        cfg.tie_word_embeddings = False
    return tied


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _residual_readers(layer: nn.Module, arch: dict) -> list[tuple[nn.Module, list[nn.Linear]]]:
    attn, mlp = layer.self_attn, layer.mlp
    return [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
            (layer.get_submodule(arch["ffn_norm"]), [mlp.gate_proj, mlp.up_proj])]


@torch.no_grad()
def rotate_residual(model: nn.Module, q: torch.Tensor, allow_inexact: bool = False) -> dict:
    """Fold every residual-side norm gain into its readers, then rotate the residual stream by ``q``.

    Refused on an architecture with post-norms on the residual path (Gemma-3) unless ``allow_inexact``
    (used by the test that measures how inexact it would be).
    """
    arch = arch_of(model)
    unit = arch["unit_offset_norm"]
    layers = decoder_layers(model)
    if arch["attn_branch_end"] != "self_attn" and not allow_inexact:
        raise RotationError(
            f"{model.config.model_type}: the residual rotation (R1) is not exact: the sublayer outputs pass "
            "through post-norms with a per-channel gain before the residual add; rotate with r1=False (R2 only)")
    untied = untie(model)
    for layer in layers:
        for norm, readers in _residual_readers(layer, arch):
            _fold_gain(norm, readers, unit)
    _fold_gain(model.model.norm, [model.lm_head], unit)
    emb = model.get_input_embeddings()
    _set(emb.weight, emb.weight.detach().double() @ q)
    for layer in layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj):
            _set(lin.weight, lin.weight.detach().double() @ q)
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            _set(lin.weight, q.T @ lin.weight.detach().double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.detach().double() @ q)
    _set(model.lm_head.weight, model.lm_head.weight.detach().double() @ q)
    return {"untied_lm_head": untied}


@torch.no_grad()
def rotate_heads(model: nn.Module, rs: list[torch.Tensor]) -> None:
    """Per layer ``i``, rotate every V head by ``rs[i]`` (D x D) and undo it in o_proj's columns."""
    cfg = _text_config(model.config)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for layer, r in zip(decoder_layers(model), rs):
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        wv = v.weight.detach().double().view(kv, d, -1)
        _set(v.weight, torch.einsum("ji,kjc->kic", r, wv).reshape(kv * d, -1))  # R^T W_v per kv head
        if v.bias is not None:
            _set(v.bias, (v.bias.detach().double().view(kv, d) @ r).reshape(-1))
        wo = o.weight.detach().double().view(o.weight.shape[0], heads, d)
        _set(o.weight, (wo @ r).reshape(o.weight.shape[0], heads * d))


def rotate(model: nn.Module, config: RotationConfig) -> dict:
    """Fold ``config``'s rotations into the float weights of ``model`` in place; returns the recipe record.

    Runs on the float model, before :func:`quant.sim.simulate`.
    """
    config.check()
    info = {**asdict(config)}
    if config.kind == "none":
        return info
    if getattr(model, "mq_scheme", None) is not None:
        raise RotationError("rotate the float model before it is simulated")
    arch = arch_of(model)
    exact_r1 = arch["attn_branch_end"] == "self_attn"
    r1 = exact_r1 if config.r1 is None else config.r1
    if r1 and not exact_r1:
        rotate_residual(model, torch.eye(1), allow_inexact=False)  # raises with the reason
    gen = torch.Generator().manual_seed(config.seed)
    cfg = _text_config(model.config)
    construction = {}
    if r1:
        q, construction["r1"] = orthogonal(config.kind, cfg.hidden_size, gen)
        info.update(rotate_residual(model, q.to(model.lm_head.weight.device)))
    if config.r2:
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rs = []
        for _ in decoder_layers(model):
            r, construction["r2"] = orthogonal(config.kind, d, gen)
            rs.append(r.to(model.lm_head.weight.device))
        rotate_heads(model, rs)
    info.update({"r1": r1, "construction": construction})
    if not exact_r1:
        info["r1_note"] = "not exact on this architecture (post-norm gains before the residual add)"
    return info
