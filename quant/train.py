"""Training loops of the learned methods: block-wise (OmniQuant-style, §4) and end to end (MobileQuant, §5).

Both start from the SmoothQuant model with RTN ranges, attach LET/LWC (and optionally learnable ranges,
``quant.learn``), train with AdamW and one parameter group per kind, each with its own per-step cosine
schedule, then fold everything into the weights. The end-to-end loop checkpoints after every epoch and
resumes from the last checkpoint; a checkpoint made with a different configuration is refused.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import files
from .graphs import GraphedLoss
from .layers import LayerRunner
from .learn import Learnables, attach, fold
from .optim import ScaledAdamW
from .quantizer import Quantizer
from .scheme import ROLES
from .sim import decoder_layers, float_mode, model_device, quantizers_off
from .stats import model_fingerprint

# Configuration fields that do not change the result: a resume may differ in them.
VOLATILE = ("checkpoint_dir", "ram_budget_gb", "calib_batch_size")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded; the last good checkpoint (if any) is kept."""


class CheckpointMismatch(ValueError):
    """A checkpoint exists for a different configuration."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters shared by the learned methods (defaults: the reference's TinyLlama W8A8 scripts)."""

    alpha: float = 0.5          # SmoothQuant initialisation
    pairs: str = "modified"     # LET / SmoothQuant pairs: original | omniquant | modified
    epochs: int = 2
    batch_size: int = 1
    let: bool = True
    lwc: bool = True
    lrl: bool = False
    let_lr: float = 1e-3
    let_min_lr: float = 1e-4
    lwc_lr: float = 1e-2
    lwc_min_lr: float = 1e-3
    lrl_lr: float = 1e-6
    lrl_min_lr: float = 1e-7
    lrl_relative: bool = False  # lrl_lr is a fraction of each range's own size (see make_optimizer)
    lwc_init: float = 4.0
    seed: int = 0
    max_loss_ratio: float = 100.0  # stop when the loss exceeds this multiple of the first step's loss
    calib_batch_size: int = 4      # forward batch for statistics and ranges
    # Quantizers switched off while training only (the result is evaluated and saved with all of them):
    # comma-separated roles, or "16bit" for every 16-bit site. 16-bit sites cost half of a step's
    # fake-quant work (attention scores and probabilities alone 40%) for a rounding error ~256x below
    # the 8-bit sites' (bench/step_overhead.py --train-float 16bit measures the speed).
    train_float: str = ""

    # Fields added after farm trial ids were first recorded, with the value that reproduces the behaviour
    # from before they existed: at that value farm leaves them out of a trial's id, so finished trials and
    # cached stages stay valid when a hyper-parameter is added.
    ID_NEUTRAL: ClassVar[dict] = {"train_float": ""}

    def identity(self) -> dict:
        """The fields that make a result: all of them but the ``ID_NEUTRAL`` ones at their neutral value
        (farm trial ids and checkpoint identities both use this)."""
        return {k: v for k, v in asdict(self).items()
                if not (k in self.ID_NEUTRAL and v == self.ID_NEUTRAL[k])}

    def check(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {self.epochs} and {self.batch_size}")
        for k in ("let_lr", "let_min_lr", "lwc_lr", "lwc_min_lr", "lrl_lr", "lrl_min_lr"):
            v = getattr(self, k)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{k} must be a finite number >= 0, got {v}")
        bad = [r for r in _split(self.train_float) if r != "16bit" and r not in ROLES]
        if bad:
            raise ValueError(f"train_float: unknown role(s) {bad}; give '16bit' or roles from {', '.join(ROLES)}")


def _split(roles: str) -> list[str]:
    return [r.strip() for r in (roles or "").split(",") if r.strip()]


def training_float_sites(model: nn.Module, roles: str) -> list[Quantizer]:
    """The active quantizers that ``TrainConfig.train_float`` switches off during training."""
    keys = set(_split(roles))
    if not keys:
        return []
    return [m for m in model.modules() if isinstance(m, Quantizer) and m.spec is not None and m.enabled
            and (m.role in keys or ("16bit" in keys and m.spec.bits == 16))]


def cosine(step: int, total: int, lr: float, min_lr: float) -> float:
    if total <= 1:
        return lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(step, total) / total))


def make_optimizer(learn: Learnables, cfg: TrainConfig, lr_scale: float = 1.0) -> ScaledAdamW:
    """AdamW, one group per kind (LET, LWC, LRL), each with its own cosine schedule.

    With ``lrl_relative`` every range parameter's learning rate is ``lrl_lr`` times the parameter's
    natural size (its initial |scale|, or the number of integer levels for an offset): a per-parameter
    multiplier inside the one LRL group (``quant.optim``). Adam's step is about the learning rate
    whatever the gradient's size, so with one absolute rate a 16-bit scale (~1e-4) moves 100x faster,
    relatively, than an 8-bit one (~1e-2); the reference gets away with 1e-6 because it takes 61k steps.
    """
    groups = []
    for kind in ("let", "lwc", "lrl"):
        hi, lo = getattr(cfg, f"{kind}_lr") * lr_scale, getattr(cfg, f"{kind}_min_lr") * lr_scale
        named = {n: p for n, p in getattr(learn, kind).items() if p.requires_grad}
        if not named:
            continue
        scales = ([learn.lrl_unit[n] for n in named] if kind == "lrl" and cfg.lrl_relative
                  else [1.0] * len(named))
        groups.append({"params": list(named.values()), "scales": scales, "lr": hi, "kind": kind,
                       "max_lr": hi, "min_lr": lo})
    if not groups:
        raise ValueError("nothing to train: enable at least one of let, lwc, lrl")
    return ScaledAdamW(groups)


def set_lrs(opt: torch.optim.Optimizer, step: int, total: int) -> dict:
    lrs = {}
    for g in opt.param_groups:
        g["lr"] = cosine(step, total, g["max_lr"], g["min_lr"])
        lrs.setdefault(f"lr_{g['kind']}", g["lr"])
    return lrs


def freeze_model(model: nn.Module, learn: Learnables) -> None:
    keep = {id(p) for p in learn.named().values()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


class TensorStore:
    """``n`` float32 tensors of one shape, in memory on ``device`` or, above ``budget_bytes``, in a
    memory-mapped file (read back one batch at a time)."""

    def __init__(self, n: int, shape: tuple, budget_bytes: float, folder: Path | None, device=None):
        self.nbytes = n * int(np.prod(shape)) * 4
        self.path = None
        if self.nbytes <= budget_bytes:
            self.data = torch.empty((n, *shape), device=device)
        else:
            if folder is None:
                raise ValueError(f"targets need {self.nbytes / 2**30:.1f} GiB, above ram_budget_gb; "
                                 "give a checkpoint_dir to keep them on disk")
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / "targets.f32"
            mm = np.memmap(self.path, dtype=np.float32, mode="w+", shape=(n, *shape))
            self.data = torch.from_numpy(mm)

    def __getitem__(self, idx):
        return self.data[idx]

    def __setitem__(self, idx, value):
        self.data[idx] = value

    def close(self) -> None:
        if self.path is not None:
            del self.data
            self.path.unlink(missing_ok=True)


def _loss_check(loss: float, first: float | None, cfg: TrainConfig, where: str, ckpt_note: str) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"{where}: loss became {loss}; {ckpt_note}. Lower the learning rates.")
    if first is not None and first > 0 and loss > cfg.max_loss_ratio * first:
        raise TrainingDiverged(f"{where}: loss exploded to {loss:.4g} (first step {first:.4g}, limit "
                               f"{cfg.max_loss_ratio:g}x); {ckpt_note}. Lower the learning rates.")


def _logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(model.model.norm(h))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _kd(model, h, target, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        t = F.log_softmax(_logits(model, target).flatten(0, -2).float() / temperature, -1)
    q = F.log_softmax(_logits(model, h).flatten(0, -2).float() / temperature, -1)
    return F.kl_div(q, t, log_target=True, reduction="batchmean") * temperature**2


# --------------------------------------------------------------------------------------------------
# block-wise


def train_blockwise(model: nn.Module, windows: torch.Tensor, cfg: TrainConfig, ctx=None) -> dict:
    """OmniQuant's routine: per layer, MSE between the quantized layer on the quantized input chain and the
    float layer on the float chain; fold; propagate the quantized chain."""
    cfg.check()
    progress, on_step = (ctx.progress, ctx.on_step) if ctx else (True, None)
    runner = LayerRunner(model)
    bs = cfg.batch_size
    t0 = time.perf_counter()
    with torch.no_grad():
        with float_mode(model):
            h_fp = torch.cat([runner.embed(b) for b in windows.split(bs)])
        h_q = torch.cat([runner.embed(b) for b in windows.split(bs)])  # differs only with an embed.out quantizer
    n = windows.shape[0]
    steps_per_epoch = math.ceil(n / bs)
    total = cfg.epochs * steps_per_epoch
    layer_loss, step_global, counts, graphs, retried = [], 0, {"let": 0, "lwc": 0, "lrl": 0}, 0, {}
    gen = torch.Generator().manual_seed(cfg.seed)
    schedule = _Schedule(total, steps_per_epoch, gen)
    layers = decoder_layers(model)
    bar = tqdm(range(len(layers)), desc="block-wise", disable=not progress, unit="layer")
    for i in bar:
        with torch.no_grad(), float_mode(model):
            out_fp = torch.cat([runner.layer(i, b) for b in h_fp.split(bs)])
        learn = attach(model, [i], cfg.pairs, cfg.let, cfg.lwc, cfg.lrl, cfg.lwc_init)
        for k, v in learn.counts().items():
            counts[k] += v
        freeze_model(model, learn)
        last = None
        off = training_float_sites(decoder_layers(model)[i], cfg.train_float)
        if total:
            retries = getattr(cfg, "layer_retries", 0)
            # what a retry starts over from (only kept when retries are allowed)
            init, rng = (learn.state_dict(), gen.get_state()) if retries else (None, None)
            for attempt in range(retries + 1):
                try:
                    last, graphs_i = _train_layer(i, runner, learn, inputs=h_q, targets=out_fp, cfg=cfg,
                                                  schedule=schedule, float_sites=off, lr_scale=0.5**attempt,
                                                  step0=step_global, on_step=on_step)
                    break
                except TrainingDiverged as e:
                    step_global += e.steps
                    if attempt == retries:
                        if attempt:
                            raise TrainingDiverged(f"{e} (after {attempt} retries of this layer, the last at "
                                                   f"1/{2**attempt} of the learning rates)") from None
                        raise
                    # the layer starts over from its initial learnables and the same batch order
                    learn.load_state_dict(init)
                    gen.set_state(rng)
                    retried[str(i)] = 0.5 ** (attempt + 1)  # str: the recipe is JSON
                    tqdm.write(f"{e.args[0].split(';')[0]}; retrying the layer at "
                               f"1/{2**(attempt + 1)} of the learning rates", file=sys.stderr)
            step_global += total
            graphs += graphs_i
        fold(model, learn)
        with torch.no_grad():
            h_q = torch.cat([runner.layer(i, b) for b in h_q.split(bs)])
            final = F.mse_loss(h_q, out_fp).item()
        layer_loss.append(round(final, 6))
        bar.set_postfix(layer_mse=f"{final:.4g}", train_loss=f"{last:.4g}" if last is not None else "-")
        h_fp = out_fp
    return {"mode": "block-wise", "steps": step_global, "steps_per_layer": total, "layer_mse": layer_loss,
            "final_mse": layer_loss[-1] if layer_loss else None, "learnables": counts,
            "cuda_graphs": graphs, "retried_layers": retried, "train_s": round(time.perf_counter() - t0, 2)}


@dataclass(frozen=True)
class _Schedule:
    """The block-wise steps every layer takes: ``total`` per layer, the batch order drawn from ``gen`` once
    per epoch of ``steps_per_epoch``."""

    total: int
    steps_per_epoch: int
    gen: torch.Generator


def _train_layer(i: int, runner, learn, *, inputs: torch.Tensor, targets: torch.Tensor, cfg, schedule: _Schedule,
                 float_sites, lr_scale: float, step0: int, on_step) -> tuple[float, int]:
    """Layer ``i``'s optimisation: its quantized output on ``inputs`` (the quantized chain) against
    ``targets`` (the float layer on the float chain), with ``float_sites`` kept in float while training and
    the learning rates scaled by ``lr_scale`` (a retried layer); returns (last loss, graphs captured). A
    divergence raises ``TrainingDiverged`` with ``steps`` set to the optimizer steps it had taken."""
    h_q, out_fp, off = inputs, targets, float_sites
    total, steps_per_epoch, gen = schedule.total, schedule.steps_per_epoch, schedule.gen
    n = h_q.shape[0]
    bs = cfg.batch_size
    opt = make_optimizer(learn, cfg, lr_scale)
    graphed = GraphedLoss(lambda h, t: F.mse_loss(runner.layer(i, h), t), learn.named().values(), h_q.device, total)
    first = last = None
    try:
        for step in range(total):
            if step % steps_per_epoch == 0:
                perm = torch.randperm(n, generator=gen)
            idx = perm[(step % steps_per_epoch) * bs:(step % steps_per_epoch + 1) * bs]
            lrs = set_lrs(opt, step, total)
            with quantizers_off(off):
                loss = graphed(h_q[idx], out_fp[idx])
                lv = loss.item()
                try:
                    _loss_check(lv, first, cfg, f"block-wise layer {i} step {step}",
                                "nothing was folded for this layer")
                except TrainingDiverged as e:
                    e.steps = step
                    raise
                first = lv if first is None else first
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            last = lv
            if on_step:
                on_step({"step": step0 + step + 1, "layer": i, "epoch": step // steps_per_epoch, "loss": lv, **lrs})
        return last, graphed.captured
    finally:
        graphed.release()


# --------------------------------------------------------------------------------------------------
# end to end


class Checkpoint:
    """``state.pt`` (learnables, optimizer, epoch, losses) and ``meta.json`` (the identity of the run)."""

    def __init__(self, folder: str | Path | None, identity: dict):
        self.folder = Path(folder) if folder else None
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))

    @property
    def state_path(self) -> Path | None:
        return self.folder / "state.pt" if self.folder else None

    def load(self) -> dict | None:
        if not self.folder or not self.state_path.exists():
            return None
        meta = files.read_json(self.folder / "meta.json", "checkpoint meta")
        diffs = _diff(meta.get("identity", {}), self.identity)
        if diffs:
            raise CheckpointMismatch(
                f"checkpoint in {self.folder} was made with a different configuration ({'; '.join(diffs)}); "
                "use another checkpoint folder or delete this one to start over")
        return torch.load(self.state_path, weights_only=False)

    def save(self, state: dict) -> None:
        if not self.folder:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)  # a crash mid-write keeps the previous epoch's checkpoint
        meta = {"identity": self.identity, "epoch": state["epoch"], "losses": state["epoch_losses"]}
        (self.folder / "meta.json.tmp").write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(self.folder / "meta.json.tmp", self.folder / "meta.json")


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the checkpoint, {b!r} now")
    return out


class E2ETrainer:
    """MobileQuant: all layers trained jointly on the MSE of the last decoder hidden state (plus an optional
    logits-distillation term), against targets from the float model computed once."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, cfg, ctx=None, identity: dict | None = None):
        cfg.check()
        self.model, self.windows, self.cfg = model, windows, cfg
        self.progress, self.on_step = (ctx.progress, ctx.on_step) if ctx else (True, None)
        self.runner = LayerRunner(model)
        self.loss_kind = getattr(cfg, "loss", "hidden")
        self.train_off = training_float_sites(model, cfg.train_float)
        self.graphed: GraphedLoss | None = None
        ident = {"config": {k: v for k, v in cfg.identity().items() if k not in VOLATILE},
                 "model": model_fingerprint(model), "scheme": getattr(model.mq_scheme, "name", None),
                 # the optimizer's state layout: a checkpoint from torch's AdamW (one group per range) is
                 # refused by name rather than failing inside load_state_dict
                 "optimizer": "scaled-adamw",
                 "windows": {"n": windows.shape[0], "seqlen": windows.shape[1],
                             "sha": _tensor_sha(windows)}}
        self.ckpt = Checkpoint(getattr(cfg, "checkpoint_dir", None), {**ident, **(identity or {})})

    def compute_targets(self) -> TensorStore:
        n, t = self.windows.shape
        hidden = self.model.config.hidden_size
        budget = getattr(self.cfg, "ram_budget_gb", 4.0) * 2**30
        store = TensorStore(n, (t, hidden), budget, self.ckpt.folder, model_device(self.model))
        bs = self.cfg.calib_batch_size
        with torch.no_grad(), float_mode(self.model):
            for j, b in enumerate(tqdm(self.windows.split(bs), desc="float targets", disable=not self.progress,
                                       unit="batch")):
                store[j * bs:j * bs + b.shape[0]] = self.runner.stack(self.runner.embed(b))
        return store

    def loss(self, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.runner.stack(self.runner.embed(ids))
        kd_w = getattr(self.cfg, "kd_weight", 1.0)
        if self.loss_kind == "hidden":
            return F.mse_loss(h, target)
        if self.loss_kind == "normed":
            norm = self.model.model.norm  # not simulated: the float norm the LM head reads
            return F.mse_loss(norm(h), norm(target))
        kd = _kd(self.model, h, target, getattr(self.cfg, "kd_temperature", 1.0))
        if self.loss_kind == "logits":
            return kd
        return F.mse_loss(h, target) + kd_w * kd

    def use_graphs(self, learn: Learnables, steps: int) -> GraphedLoss:
        """Replay the loss from a CUDA graph from the second step on (``quant.graphs``; eager on a CPU)."""
        self.graphed = GraphedLoss(self.loss, learn.named().values(), model_device(self.model), steps)
        return self.graphed

    def step(self, opt, ids, target) -> float:
        dev = model_device(self.model)
        loss_fn = self.graphed or self.loss
        with quantizers_off(self.train_off):
            loss = loss_fn(ids.to(dev, non_blocking=True), target.to(dev, non_blocking=True))
            lv = loss.item()
            if not math.isfinite(lv):
                return lv
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        return lv

    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        state = self.ckpt.load()
        learn = attach(self.model, None, cfg.pairs, cfg.let, cfg.lwc, cfg.lrl, cfg.lwc_init)
        freeze_model(self.model, learn)
        n = self.windows.shape[0]
        bs = cfg.batch_size
        spe = math.ceil(n / bs)
        total = cfg.epochs * spe
        opt = make_optimizer(learn, cfg) if total else None
        start_epoch, epoch_losses, first = 0, [], None
        if state is not None:
            learn.load_state_dict(state["learnables"])
            if opt is not None and state.get("optimizer"):
                opt.load_state_dict(state["optimizer"])
            start_epoch, epoch_losses, first = state["epoch"], list(state["epoch_losses"]), state.get("first_loss")
        resumed = start_epoch
        graphed = self.use_graphs(learn, total - start_epoch * spe)
        store = self.compute_targets() if start_epoch < cfg.epochs else None
        note = (f"the last good checkpoint (epoch {{e}}) is kept in {self.ckpt.folder}" if self.ckpt.folder
                else "no checkpoint_dir was given, so nothing was kept")
        bar = tqdm(total=total, initial=start_epoch * spe, desc="mobilequant e2e", disable=not self.progress,
                   unit="step")
        try:
            for epoch in range(start_epoch, cfg.epochs):
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
                run_sum = 0.0
                for k in range(spe):
                    step = epoch * spe + k
                    idx = perm[k * bs:(k + 1) * bs]
                    lrs = set_lrs(opt, step, total)
                    lv = self.step(opt, self.windows[idx], store[idx])
                    _loss_check(lv, first, cfg, f"mobilequant epoch {epoch} step {step}",
                                note.format(e=epoch) if self.ckpt.folder and epoch > 0
                                else "no epoch had finished, so there is no checkpoint" if self.ckpt.folder
                                else note)
                    first = lv if first is None else first
                    run_sum += lv
                    bar.update(1)
                    bar.set_postfix(loss=f"{lv:.4g}", epoch=epoch)
                    if self.on_step:
                        self.on_step({"step": step + 1, "epoch": epoch, "loss": lv, **lrs})
                epoch_losses.append(round(run_sum / spe, 6))
                self.ckpt.save({"epoch": epoch + 1, "learnables": learn.state_dict(),
                                "optimizer": opt.state_dict(), "epoch_losses": epoch_losses, "first_loss": first})
        finally:
            bar.close()
            if store is not None:
                store.close()
            graphed.release()
        fold(self.model, learn)
        return {"mode": "end-to-end", "steps": total, "resumed_from_epoch": resumed, "first_loss": first,
                "epoch_losses": epoch_losses, "loss": self.loss_kind, "learnables": learn.counts(),
                "cuda_graphs": graphed.captured,
                "targets_on_disk": bool(store is not None and store.path is not None),
                "train_s": round(time.perf_counter() - t0, 2)}


def _tensor_sha(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
