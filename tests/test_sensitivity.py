"""The error budget (quant.sensitivity, `farm sensitivity`) on real truncated SmolLM2 checkpoints."""

import json
import math

import pytest
import torch

from farm.cli import main
from quant import CalibConfig, load_model, quantize
from quant.eval.perplexity import perplexity
from quant.scheme import ROLES, Scheme, get_scheme
from quant.sensitivity import error_budget

NAME = "smollm2-135m"


def _quantized(layers, scheme="w8a8"):
    lm = load_model(NAME, num_layers=layers)
    quantize(lm, scheme, "rtn", CalibConfig(4, 64, 0), progress=False)
    return lm


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False).logits


def test_roles_counted_exactly_and_model_restored(small_ids):
    ids, _ = small_ids[NAME]
    lm = _quantized(2)
    before = _logits(lm, ids)
    budget = error_budget(lm.model, ids, by="role", progress=False)
    sites = {r.group: r.quantizers for r in budget.rows}
    # per layer: 3 q/k/v weights and outputs, 2 norms with an input, gain and output each, 2 gate/up
    # weights and outputs; single sites for the rest; every site quantized in W8A8 appears, no other
    assert sites == {role: 2 * {"qkv.weight": 3, "qkv.out": 3, "gate_up.weight": 2, "gate_up.out": 2,
                                "norm.in": 2, "norm.weight": 2, "norm.out": 2}.get(role, 1)
                     for role in ROLES if get_scheme("w8a8").spec(role) and role not in
                     ("post_norm.weight", "qk_norm.weight")}
    assert torch.equal(_logits(lm, ids), before)  # every site is back on, bit for bit
    assert budget.quant_ppl > budget.fp_ppl
    assert [r.share for r in budget.rows] == sorted((r.share for r in budget.rows), reverse=True)
    assert all(math.isfinite(r.share) for r in budget.rows)


def test_group_ppl_equals_a_scheme_without_that_role(small_ids):
    """Switching a role off in place is the same model as a scheme that never quantized it."""
    ids, _ = small_ids[NAME]
    lm = _quantized(2)
    budget = error_budget(lm.model, ids, by="role", progress=False)
    down_in = next(r for r in budget.rows if r.group == "down.in")
    table = dict(get_scheme("w8a8").table, **{"down.in": None})
    ref = _quantized(2, Scheme("w8a8-no-down-in", table))
    assert perplexity(ref.model, ids, progress=False).ppl == pytest.approx(down_in.ppl, rel=1e-9)


def test_one_layer_model_recovers_the_whole_gap(small_ids):
    ids, _ = small_ids[NAME]
    lm = _quantized(1)
    budget = error_budget(lm.model, ids, by="layer", progress=False)
    assert [r.group for r in budget.rows] == ["layer 00"]
    assert budget.rows[0].ppl == pytest.approx(budget.fp_ppl, rel=1e-12)
    assert budget.rows[0].share == pytest.approx(1.0, abs=1e-9)


def test_float_model_is_refused():
    lm = load_model(NAME, num_layers=1)
    with pytest.raises(ValueError, match="no active quantizer"):
        error_budget(lm.model, torch.zeros(1, 8, dtype=torch.long), progress=False)


def test_cli_on_an_artifact(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["quantize", "--model", NAME, "--layers", "2", "--scheme", "w8a8", "--calib-samples", "4",
                 "--seqlen", "64", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sensitivity", str(out), "--by", "layer", "--limit", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["by"] == "layer" and res["windows"] == 2 and res["seqlen"] == 64
    assert sorted(r["group"] for r in res["rows"]) == ["layer 00", "layer 01"]
    assert main(["sensitivity", str(out), "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
