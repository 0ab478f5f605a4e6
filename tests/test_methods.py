"""The learned methods: exact equivalences, LWC at init, gradient flow, resume, refusal and divergence."""

import json

import pytest
import torch

from quant import CalibConfig, kernels, load_model, quantize
from quant.equiv import layer_pairs
from quant.learn import attach, fold
from quant.layers import LayerRunner
from quant.methods import method_config
from quant.methods.smoothquant import smooth
from quant.quantizer import fake_quant, qparams_from_minmax
from quant.sim import calibrate_activations, calibrate_weights, quantizers, simulate
from quant.stats import ActStats, collect
from quant.train import CheckpointMismatch, TrainingDiverged, freeze_model

from .conftest import ARCH_MODELS

CAL = CalibConfig(samples=4, seqlen=64)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@pytest.mark.parametrize("name", ARCH_MODELS)
def test_smoothquant_is_an_exact_equivalence(name, small_ids):
    ev, cal = small_ids[name]
    lm = load_model(name, num_layers=2)
    ref = _logits(lm.model, ev)
    simulate(lm.model, "fp")
    absmax, minmax = collect(lm.model, cal, progress=False)
    info = smooth(lm.model, ActStats(absmax, minmax, "t", 4, 0), alpha=0.5, pairs="modified")
    assert info["pairs"] == ["qkv", "fc1", "out", "fc2"]
    assert max(info["max_scale_spread"].values()) > 2  # the scales really move something
    assert _rel(_logits(lm.model, ev), ref) < 1e-4


@pytest.mark.parametrize("name", ARCH_MODELS)
def test_let_temporary_and_folded_are_equivalent(name, small_ids):
    """Random LET scales leave the float function unchanged, both as the training-time reparametrisation
    and after folding into the weights."""
    ev, _ = small_ids[name]
    lm = load_model(name, num_layers=2)
    ref = _logits(lm.model, ev)
    simulate(lm.model, "fp")
    learn = attach(lm.model, pairs="modified", lwc=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in learn.let.values():
            p.copy_(torch.exp(torch.randn(p.shape, generator=g) * 0.5))  # scales in ~[0.2, 5]
    assert len(learn.let) == 2 * len(layer_pairs(lm.model, "modified"))
    temporary = _logits(lm.model, ev)
    fold(lm.model, learn)
    folded = _logits(lm.model, ev)
    assert _rel(temporary, ref) < 1e-4 and _rel(folded, ref) < 1e-4
    assert all(m._let is None for m in lm.model.modules() if hasattr(m, "_let"))


def test_lwc_at_init_is_minmax_clipping_scaled_by_sigmoid(small_ids):
    lm = load_model("smollm2-135m", num_layers=1)
    simulate(lm.model, "w4a8")  # per-channel weights
    calibrate_weights(lm.model)
    lin = lm.model.model.layers[0].mlp.down_proj
    q = lin.weight_quantizer
    rtn_w = lin._quantized_weight().clone()
    w = lin.weight.detach()
    q.enable_lwc(w.shape[0], init=4.0)
    s = torch.sigmoid(torch.tensor(4.0))
    scale, offset = qparams_from_minmax(s * w.amin(1), s * w.amax(1), q.spec)
    assert torch.equal(lin._quantized_weight().detach(), fake_quant(w, scale, offset, q.spec))
    q.disable_lwc()
    q.enable_lwc(w.shape[0], init=30.0)  # sigmoid(30) == 1.0 in float32: exactly the min/max (RTN) range
    assert torch.equal(lin._quantized_weight().detach(), rtn_w)


def test_gradients_reach_every_let_lwc_and_range_parameter(small_ids, monkeypatch):
    _, cal = small_ids["smollm2-135m"]
    fused = []  # passes of the fused LET loops (quant.kernels) rather than torch ops
    for name in ("let_forward", "let_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _r=real, _n=name: fused.append(_n) or _r(*a))
    lm = load_model("smollm2-135m", num_layers=2)
    simulate(lm.model, "w8a8")
    calibrate_weights(lm.model)
    calibrate_activations(lm.model, cal.split(2), progress=False)
    with torch.no_grad():  # shrink every range so offsets (which only move the clip bounds) see clipping
        for q in quantizers(lm.model, "act").values():
            q.set_qparams(q.scale * 0.5, q.offset)
    learn = attach(lm.model, pairs="modified", lwc=True, lrl=True)
    freeze_model(lm.model, learn)  # as training does
    runner = LayerRunner(lm.model)
    with torch.no_grad():
        target = runner.stack(runner.embed(cal[:1])) + 0.01
    fused.clear()
    loss = torch.nn.functional.mse_loss(runner.stack(runner.embed(cal[:1])), target)
    loss.backward()
    # q, k, v, o, gate, up and down in each of the 2 layers, forward and backward; the norms' gains are 1-D
    assert sorted(fused) == ["let_backward"] * 14 + ["let_forward"] * 14
    counts = learn.counts()
    assert counts["let"] == 2 * (576 + 576 + 192 + 1536)  # qkv, fc1, out (3 kv heads x 64), fc2 per layer
    assert len(learn.lrl) == 2 * 2 * len([q for q in quantizers(lm.model, "act").values()]) // 2
    # a gain vector with no negative entry has its range widened to 0 at the low end, so its low clipping
    # factor has no effect (and no gradient) by construction
    positive = {f"{m.weight_quantizer.name}.lwc_low" for m in lm.model.modules()
                if hasattr(m, "weight_quantizer") and m.weight_quantizer.spec is not None
                and m.effective_weight().min() >= 0}
    assert positive and all("layernorm" in n for n in positive)
    named = learn.named()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in named.values())
    dead = [n for n, p in named.items() if n not in positive and not n.endswith(".offset") and p.grad.abs().sum() == 0]
    assert dead == [], dead
    # an offset only moves the clip bounds: sites fed by a tensor already clipped to the same range (attn.v
    # after v_proj's output quantizer, docs/reference.md#precision-table) never clip, so their offset gradient is zero
    offsets = [p for n, p in named.items() if n.endswith(".offset")]
    assert sum(bool(p.grad.abs().sum() > 0) for p in offsets) > 0.6 * len(offsets)


def test_method_config_validation():
    cfg = method_config("mobilequant", {"epochs": 3, "let_lr": 2e-3})
    assert cfg.epochs == 3 and cfg.let_lr == 2e-3 and cfg.lrl is True
    assert method_config("lrl-block").lrl is True and method_config("omniquant").lrl is False
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['epoch'\]"):
        method_config("mobilequant", {"epoch": 3})
    with pytest.raises(ValueError, match="epochs must be an integer"):
        method_config("omniquant", {"epochs": 1.5})
    with pytest.raises(ValueError, match="alpha must be in"):
        method_config("smoothquant", {"alpha": 1.5})


def _mq(tmp_path, on_step=None, **over):
    lm = load_model("smollm2-135m", num_layers=2)
    cfg = {"epochs": 2, "checkpoint_dir": str(tmp_path / "ckpt"), **over}
    res = quantize(lm, "w8a8", "mobilequant", CAL, method_config=cfg, progress=False, on_step=on_step)
    return lm, res


@pytest.mark.slow
def test_mobilequant_resume_after_interrupt_continues_the_same_run(tmp_path):
    """Interrupted in epoch 2 and resumed: epoch 1 is not redone, the first resumed step sees exactly the
    checkpointed state (same loss as the uninterrupted run to float rounding: re-allocated tensors may take
    other BLAS kernels), and the run ends at the same step count."""
    full_losses = []
    _, res_full = _mq(tmp_path / "a", on_step=lambda r: full_losses.append(r["loss"]))
    assert res_full.recipe["method_info"]["steps"] == 8 and len(res_full.recipe["method_info"]["epoch_losses"]) == 2

    seen = []

    def interrupt(rec):
        seen.append(rec["loss"])
        if rec["step"] == 6:  # inside epoch 2: epoch 1's checkpoint is on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _mq(tmp_path / "b", on_step=interrupt)
    assert seen == full_losses[:6]
    meta = json.loads((tmp_path / "b" / "ckpt" / "meta.json").read_text())
    assert meta["epoch"] == 1 and meta["losses"] == res_full.recipe["method_info"]["epoch_losses"][:1]
    resumed = []
    _, res = _mq(tmp_path / "b", on_step=lambda r: resumed.append((r["step"], r["loss"])))
    info = res.recipe["method_info"]
    assert info["resumed_from_epoch"] == 1 and [s for s, _ in resumed] == [5, 6, 7, 8]
    assert resumed[0][1] == pytest.approx(full_losses[4], rel=1e-5)
    assert info["epoch_losses"][0] == res_full.recipe["method_info"]["epoch_losses"][0]

    with pytest.raises(CheckpointMismatch, match=r"config\.epochs: 2 in the checkpoint, 3 now"):
        _mq(tmp_path / "b", epochs=3)

    # a checkpoint from before ScaledAdamW (torch AdamW, one group per range) is refused by name
    meta_path = tmp_path / "b" / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["identity"]["optimizer"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatch, match=r"optimizer: '<absent>' in the checkpoint, 'scaled-adamw' now"):
        _mq(tmp_path / "b")


def test_mobilequant_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    holder = {}

    def poison(rec):
        if rec["step"] == 5:  # first step of epoch 2
            for q in holder["lm"].model.modules():
                if getattr(q, "lwc_up", None) is not None:
                    with torch.no_grad():
                        q.lwc_up.fill_(float("nan"))
                    break

    lm = load_model("smollm2-135m", num_layers=2)
    holder["lm"] = lm
    with pytest.raises(TrainingDiverged, match=r"loss became nan.*last good checkpoint \(epoch 1\)"):
        quantize(lm, "w8a8", "mobilequant", CAL, progress=False, on_step=poison,
                 method_config={"epochs": 2, "checkpoint_dir": str(tmp_path / "ckpt")})
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert meta["epoch"] == 1 and len(meta["losses"]) == 1
    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["learnables"].values())


def test_mobilequant_targets_on_disk_give_identical_result(tmp_path, small_ids):
    ev, _ = small_ids["smollm2-135m"]
    lm_ram, r1 = _mq(tmp_path / "ram", epochs=1)
    lm_disk, r2 = _mq(tmp_path / "disk", epochs=1, ram_budget_gb=1e-6)
    assert not r1.recipe["method_info"]["targets_on_disk"] and r2.recipe["method_info"]["targets_on_disk"]
    assert not (tmp_path / "disk" / "ckpt" / "targets.f32").exists()  # cleaned up
    assert torch.equal(_logits(lm_ram.model, ev), _logits(lm_disk.model, ev))


@pytest.mark.parametrize("method", ["omniquant", "lrl-block", "mobilequant"])
def test_learned_methods_reduce_the_training_loss(method, small_ids):
    """One epoch on 4 windows: the final block output error must drop below SmoothQuant+RTN's."""
    lm = load_model("smollm2-135m", num_layers=2)
    res = quantize(lm, "w8a8", method, CAL, progress=False,
                   method_config={"epochs": 3, "lwc_lr": 5e-3, "let_lr": 5e-3})
    info = res.recipe["method_info"]
    if method == "mobilequant":
        losses = info["epoch_losses"]
        assert losses[-1] < losses[0]
    else:
        assert info["steps"] == 2 * 3 * 4 and len(info["layer_mse"]) == 2
    assert all(q.calibrated and not q.learning for q in quantizers(lm.model).values())
    assert lm.model.model.layers[0].self_attn.q_proj.weight.requires_grad is False


def test_artifact_of_learned_method_reloads_bit_exact(tmp_path, small_ids):
    from quant import artifact

    ev, _ = small_ids["smollm2-135m"]
    lm, res = _mq(tmp_path, epochs=1)
    before = _logits(lm.model, ev)
    path = artifact.save(lm.model, lm.tokenizer, tmp_path / "art", res.recipe)
    again = artifact.load(path)
    assert torch.equal(_logits(again.model, ev), before)
    assert again.recipe["method"] == "mobilequant" and again.recipe["method_config"]["epochs"] == 1


def test_relative_range_learning_rates_and_cosine_schedule(small_ids):
    from quant.train import TrainConfig, cosine, make_optimizer, set_lrs

    assert cosine(0, 10, 1e-2, 1e-3) == pytest.approx(1e-2) and cosine(10, 10, 1e-2, 1e-3) == pytest.approx(1e-3)
    assert cosine(5, 10, 1e-2, 1e-3) == pytest.approx(5.5e-3)
    _, cal = small_ids["smollm2-135m"]
    lm = load_model("smollm2-135m", num_layers=1)
    simulate(lm.model, "w8a8")
    calibrate_weights(lm.model)
    calibrate_activations(lm.model, cal.split(2), progress=False)
    learn = attach(lm.model, lwc=True, lrl=True)
    cfg = TrainConfig(lrl=True, lrl_relative=True, lrl_lr=1e-3, lrl_min_lr=1e-4)
    opt = make_optimizer(learn, cfg)
    lrl = [g for g in opt.param_groups if g["kind"] == "lrl"]
    assert len(lrl) == 1 and len(lrl[0]["params"]) == len(learn.lrl)  # one group, a multiplier per parameter

    def rate(p):  # the learning rate parameter p is stepped with
        i = next(k for k, q in enumerate(lrl[0]["params"]) if q is p)
        return lrl[0]["lr"] * lrl[0]["scales"][i]

    q16 = quantizers(lm.model, "act")["model.layers.0.self_attn.attn.scores"]  # 16-bit site
    q8 = quantizers(lm.model, "act")["model.layers.0.mlp.down_proj.input"]
    assert rate(q16.scale) == pytest.approx(1e-3 * q16.scale.abs().item())
    assert rate(q8.scale) == pytest.approx(1e-3 * q8.scale.abs().item())
    assert rate(q16.offset) == pytest.approx(1e-3 * 65535)
    assert rate(q8.offset) == pytest.approx(1e-3 * 255)
    set_lrs(opt, 20, 20)
    assert rate(q8.offset) == pytest.approx(1e-4 * 255)
    let_groups = [g for g in opt.param_groups if g["kind"] == "let"]
    assert len(let_groups) == 1 and let_groups[0]["lr"] == pytest.approx(cfg.let_min_lr)


@pytest.mark.parametrize("method", ["lrl-block", "mobilequant"])
def test_train_float_keeps_sites_float_in_training_only(method):
    """``train_float=16bit``: every 16-bit activation site is off in each training step, so its learnable
    range never gets a gradient and ends exactly at its SmoothQuant+RTN value, while 8-bit ranges move;
    without the option the 16-bit ranges move too. Afterwards every quantizer is on again."""
    def ranges(train_float, epochs):
        lm = load_model("smollm2-135m", num_layers=2)
        quantize(lm, "w8a8", method, CAL, progress=False,
                 method_config={"epochs": epochs, "lwc_lr": 5e-3, "let_lr": 5e-3, "train_float": train_float})
        qs = quantizers(lm.model, "act")
        assert all(q.enabled for q in qs.values() if q.spec is not None)
        return {n: (q.spec.bits, q.scale.clone(), q.offset.clone()) for n, q in qs.items() if q.spec is not None}

    init, frozen, trained = ranges("", 0), ranges("16bit", 2), ranges("", 2)
    sixteen = [n for n, (bits, _, _) in init.items() if bits == 16]
    eight = [n for n, (bits, _, _) in init.items() if bits == 8]
    assert len(sixteen) == 2 * 6 and len(eight) > len(sixteen)  # norm.in x2, scores, probs, o.out, down.out
    same = lambda a, b, n: torch.equal(a[n][1], b[n][1]) and torch.equal(a[n][2], b[n][2])  # noqa: E731
    assert all(same(init, frozen, n) for n in sixteen)
    assert sum(not same(init, frozen, n) for n in eight) > len(eight) // 2
    assert sum(not same(init, trained, n) for n in sixteen) > len(sixteen) // 2


def test_train_float_names_an_unknown_role():
    with pytest.raises(ValueError, match=r"train_float: unknown role\(s\) \['attn.score'\]"):
        method_config("mobilequant", {"train_float": "16bit,attn.score"})


def _poison_layer(lm, layer: int, times: int):
    """An on_step hook that sets one LWC factor of ``layer`` to NaN at its first step, ``times`` times."""
    left = {"n": times}

    def hook(rec):
        if rec.get("layer") == layer and left["n"] > 0:
            left["n"] -= 1
            q = next(m for n, m in lm.model.named_modules()
                     if f"layers.{layer}." in n and getattr(m, "lwc_up", None) is not None)
            with torch.no_grad():
                q.lwc_up.fill_(float("nan"))
    return hook


def test_blockwise_layer_retry_restarts_the_diverged_layer_at_half_rates():
    cfg = {"epochs": 2, "layer_retries": 2}
    clean = quantize(load_model("smollm2-135m", num_layers=2), "w8a8", "omniquant", CAL, progress=False,
                     method_config=cfg).recipe["method_info"]
    lm = load_model("smollm2-135m", num_layers=2)
    info = quantize(lm, "w8a8", "omniquant", CAL, progress=False, on_step=_poison_layer(lm, 1, 1),
                    method_config=cfg).recipe["method_info"]
    assert info["retried_layers"] == {"1": 0.5} and clean["retried_layers"] == {}
    assert info["layer_mse"][0] == clean["layer_mse"][0]  # the layer before is untouched
    # the poisoned attempt stopped after its first step, then the layer ran in full
    assert info["steps"] == clean["steps"] + 1
    assert all(torch.isfinite(q.scale).all() for q in quantizers(lm.model).values())
    # retrying twice and still diverging stops the run, naming the retries
    lm = load_model("smollm2-135m", num_layers=2)
    with pytest.raises(TrainingDiverged, match=r"layer 1 step 1: loss became nan.*after 2 retries.*1/4"):
        quantize(lm, "w8a8", "omniquant", CAL, progress=False, on_step=_poison_layer(lm, 1, 3), method_config=cfg)
    # without retries the first divergence stops the run, as before
    lm = load_model("smollm2-135m", num_layers=2)
    with pytest.raises(TrainingDiverged, match=r"layer 1 step 1: loss became nan; nothing was folded"):
        quantize(lm, "w8a8", "omniquant", CAL, progress=False, on_step=_poison_layer(lm, 1, 1),
                 method_config={"epochs": 2})
    with pytest.raises(ValueError, match="layer_retries must be an integer >= 0"):
        method_config("omniquant", {"layer_retries": -1}).check()


@pytest.mark.parametrize("loss", ["hidden", "normed", "logits", "hidden+logits"])
def test_end_to_end_losses_vanish_at_the_target_and_match_their_formula(loss, small_ids):
    import torch.nn.functional as F

    from quant.methods.mobilequant import MobileQuantConfig
    from quant.train import E2ETrainer

    _, cal = small_ids["smollm2-135m"]
    lm = load_model("smollm2-135m", num_layers=2)
    simulate(lm.model, "w8a8")
    calibrate_weights(lm.model)
    calibrate_activations(lm.model, [cal], progress=False)
    cfg = MobileQuantConfig(loss=loss, kd_weight=0.5, kd_temperature=2.0)
    tr = E2ETrainer(lm.model, cal, cfg)
    with torch.no_grad():
        h = tr.runner.stack(tr.runner.embed(cal))
        assert tr.loss(cal, h).item() == pytest.approx(0.0, abs=1e-6)  # the model's own output as target
        target = h + 0.3 * torch.randn_like(h)
        norm, head = lm.model.model.norm, lm.model.lm_head
        kd = F.kl_div(F.log_softmax(head(norm(h)).flatten(0, 1) / 2, -1),
                      F.log_softmax(head(norm(target)).flatten(0, 1) / 2, -1), log_target=True,
                      reduction="batchmean") * 4
        want = {"hidden": F.mse_loss(h, target), "normed": F.mse_loss(norm(h), norm(target)), "logits": kd,
                "hidden+logits": F.mse_loss(h, target) + 0.5 * kd}[loss]
        assert tr.loss(cal, target).item() == pytest.approx(want.item(), rel=1e-5) and want.item() > 0
