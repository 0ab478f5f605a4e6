"""Rotations folded into the weights: the matrices are orthogonal, the rotated float model computes the same
logits (within 1e-4 of their range, float32), Gemma-3's post-norms are the one obstacle to R1, and a
rotated, quantized model saves and reloads bit-exact."""

import pytest
import torch

from quant import CalibConfig, load_model, quantize, rotation
from quant.rotation import RotationConfig, RotationError

from .conftest import ARCH_MODELS


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


def _range_err(a, b) -> float:
    """Max abs difference as a fraction of the reference logits' range."""
    return ((a - b).abs().max() / (b.max() - b.min())).item()


@pytest.mark.parametrize("n", [12, 20, 64, 256, 576, 640])
def test_hadamard_orders_of_both_models_are_true_hadamard_matrices(n):
    h, how = rotation.hadamard(n)
    assert h is not None, how
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("kind,n", [("random", 576), ("hadamard", 576), ("hadamard", 640), ("hadamard", 36)])
def test_rotation_matrices_are_orthogonal(kind, n):
    q, how = rotation.orthogonal(kind, n, torch.Generator().manual_seed(0))
    assert (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    if n == 36:  # 36 = 4 x 9 has no Sylvester/Paley-I factorisation here: the Kronecker fallback
        assert how.startswith("H4 x random-orthogonal9")


@pytest.mark.parametrize("name", ARCH_MODELS)
@pytest.mark.parametrize("kind", ["random", "hadamard"])
def test_rotated_float_model_is_equivalent(name, kind, small_ids):
    ev, _ = small_ids[name]
    lm = load_model(name, num_layers=3)
    ref = _logits(lm.model, ev)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    info = rotation.rotate(lm.model, RotationConfig(kind=kind, seed=1))
    assert info["r1"] is (name == "smollm2-135m")  # R1 only where exact
    assert info["r2"] is True
    moved = [n for n, p in lm.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("v_proj" in n for n in moved) and any("o_proj" in n for n in moved)
    if info["r1"]:
        assert info["untied_lm_head"] is True and lm.model.config.tie_word_embeddings is False
        assert lm.model.lm_head.weight.data_ptr() != lm.model.model.embed_tokens.weight.data_ptr()
        assert any("embed_tokens" in n for n in moved) and any("down_proj" in n for n in moved)
        assert torch.equal(lm.model.model.norm.weight, torch.ones_like(lm.model.model.norm.weight))
    assert _range_err(_logits(lm.model, ev), ref) < 1e-4


@pytest.mark.slow
def test_full_smollm2_rotated_is_equivalent(small_ids):
    ev, _ = small_ids["smollm2-135m"]
    lm = load_model("smollm2-135m")
    ref = _logits(lm.model, ev[:1])
    rotation.rotate(lm.model, RotationConfig(kind="hadamard"))
    assert _range_err(_logits(lm.model, ev[:1]), ref) < 1e-4


def _gemma(ids, constant_post_gains=False):
    """A 2-layer Gemma-3 restricted to the tokens of ``ids`` (its embedding and tied head keep only those
    rows: the same function on those logits, and the vocab x d rotation becomes cheap) and the ids remapped."""
    lm = load_model("gemma3-270m", num_layers=2)
    used, remapped = torch.unique(ids, return_inverse=True)
    emb = lm.model.model.embed_tokens
    emb.weight = torch.nn.Parameter(emb.weight.detach()[used].clone(), requires_grad=False)
    lm.model.lm_head.weight = emb.weight
    if constant_post_gains:
        for layer in lm.model.model.layers:
            for n in ("post_attention_layernorm", "post_feedforward_layernorm"):
                getattr(layer, n).weight.data.fill_(0.25)
    return lm, remapped


def test_gemma_residual_rotation_is_inexact_because_of_the_post_norm_gains(small_ids):
    ev, _ = small_ids["gemma3-270m"]
    lm, ids = _gemma(ev)
    with pytest.raises(RotationError, match="post-norms"):
        rotation.rotate(lm.model, RotationConfig(kind="hadamard", r1=True))
    q, _ = rotation.orthogonal("random", lm.model.config.hidden_size, torch.Generator().manual_seed(0))
    ref = _logits(lm.model, ids)
    rotation.rotate_residual(lm.model, q, allow_inexact=True)
    assert _range_err(_logits(lm.model, ids), ref) > 1e-2  # far from float rounding

    # the same model with constant post-norm gains rotates exactly: those gains are the only obstacle
    lm, ids = _gemma(ev, constant_post_gains=True)
    ref = _logits(lm.model, ids)
    rotation.rotate_residual(lm.model, q, allow_inexact=True)
    assert _range_err(_logits(lm.model, ids), ref) < 1e-4


def test_rotate_refuses_bad_input():
    with pytest.raises(RotationError, match="rotate must be one of"):
        rotation.config_of("givens")
    with pytest.raises(RotationError, match="unknown field"):
        rotation.config_of({"kind": "random", "sed": 1})


def test_rotated_mobilequant_saves_and_reloads_bit_exact(tmp_path, small_ids):
    from quant import artifact

    ev, _ = small_ids["smollm2-135m"]
    lm = load_model("smollm2-135m", num_layers=2)
    res = quantize(lm, "w8a8", "mobilequant", CalibConfig(samples=2, seqlen=64),
                   method_config={"epochs": 1}, progress=False, rotate={"kind": "hadamard", "seed": 3})
    rec = res.recipe["rotation"]
    assert rec["kind"] == "hadamard" and rec["seed"] == 3 and rec["r1"] and rec["untied_lm_head"]
    before = _logits(lm.model, ev)
    path = artifact.save(lm.model, lm.tokenizer, tmp_path / "art", res.recipe)
    again = artifact.load(path)
    assert torch.equal(_logits(again.model, ev), before)
    assert again.recipe["rotation"] == rec
    assert again.model.lm_head.weight.data_ptr() != again.model.model.embed_tokens.weight.data_ptr()


def test_cli_rotate_and_split(tmp_path, capsys):
    import json

    from farm.cli import main
    from quant import artifact, evaluate_perplexity

    out = tmp_path / "rot"
    rc = main(["quantize", "--model", "smollm2-135m", "--layers", "2", "--scheme", "w8a8", "--method", "rtn",
               "--calib-samples", "2", "--seqlen", "64", "--rotate", "hadamard", "--rotate-seed", "7",
               "--out", str(out), "--json"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)["recipe"]["rotation"]
    assert rec["kind"] == "hadamard" and rec["seed"] == 7 and rec["r1"] is True
    rc = main(["eval", str(out), "--split", "validation", "--limit", "2", "--json"])
    got = json.loads(capsys.readouterr().out)["perplexity"]
    want = evaluate_perplexity(artifact.load(out), 64, limit=2, split="validation", progress=False)
    test = evaluate_perplexity(artifact.load(out), 64, limit=2, split="test", progress=False)
    assert rc == 0 and got["ppl"] == want.ppl and got["ppl"] != test.ppl
    with pytest.raises(SystemExit) as exit_:  # argparse's refusal of a value outside the choices
        main(["quantize", "--model", "smollm2-135m", "--rotate", "givens", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "--rotate: invalid choice: 'givens'" in capsys.readouterr().err
