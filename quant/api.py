"""The notebook-level API: quantize a loaded model with a method and a scheme, evaluate it."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field, is_dataclass

import torch

from . import data
from .eval.perplexity import PerplexityResult, perplexity
from .methods import MethodContext, get_method
from .methods import method_config as method_config_for
from . import numerics, rotation
from .scheme import get_scheme
from .sim import check_calibrated, model_device, simulate
from .zoo import LoadedModel


@dataclass(frozen=True)
class CalibConfig:
    samples: int = 32
    seqlen: int = 512
    seed: int = 0
    corpus: str = data.DEFAULT_CALIB


def check_seqlen(lm: LoadedModel, seqlen: int) -> None:
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if lm.max_context and seqlen > lm.max_context:
        raise ValueError(f"seqlen {seqlen} is above the context of {lm.name} ({lm.max_context} tokens)")


def versions() -> dict:
    import transformers

    from . import __version__

    return {"quant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@dataclass
class QuantizeResult:
    lm: LoadedModel
    recipe: dict = field(default_factory=dict)


def _config_dict(cfg) -> dict:
    return asdict(cfg) if is_dataclass(cfg) else dict(cfg or {})


def quantize(lm: LoadedModel, scheme: str = "w8a8", method: str = "rtn", calib: CalibConfig | None = None,
             method_config=None, progress: bool = True, on_step=None, rotate=None) -> QuantizeResult:
    """Quantize ``lm.model`` in place with ``method`` under ``scheme``; returns the model and its recipe.

    ``rotate``: ``"random"``, ``"hadamard"``, a dict of :class:`quant.rotation.RotationConfig` fields or
    one: an orthogonal rotation folded into the float weights first (``quant.rotation``), so the method's
    smoothing, clipping and ranges are found on the rotated model. The recipe records it.

    ``method_config``: the method's ``Config`` or a dict of overrides. ``on_step``: called by training
    methods with a dict per optimizer step (``step``, ``epoch``, ``loss``, learning rates).
    """
    calib = calib or CalibConfig()
    scheme_obj = get_scheme(scheme)
    check_seqlen(lm, calib.seqlen)
    get_method(method)
    rot = rotation.config_of(rotate)
    if method_config is None or isinstance(method_config, dict):
        method_config = method_config_for(method, method_config)
    recipe = {
        "model": lm.name, "num_layers": lm.num_layers, "total_layers": lm.total_layers, "add_bos": lm.add_bos,
        "scheme": scheme_obj.name, "method": method, "method_config": _config_dict(method_config),
        "calibration": asdict(calib), "versions": versions(), "numerics_version": numerics.NUMERICS_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    t0 = time.perf_counter()
    if rot.kind != "none":
        recipe["rotation"] = rotation.rotate(lm.model, rot)
    if scheme_obj.is_float:
        recipe["method"] = "none"
        recipe["method_config"] = {}
        recipe["timing"] = {"quantize_s": 0.0}
        return QuantizeResult(lm, recipe)
    windows = data.calibration_windows(lm.tokenizer, calib.samples, calib.seqlen, calib.seed, calib.corpus,
                                       add_bos=lm.add_bos).to(model_device(lm.model))
    recipe["calibration"]["corpus_id"] = data.corpus_id(calib.corpus)
    simulate(lm.model, scheme_obj)
    ctx = MethodContext(lm=lm, calib=calib, on_step=on_step, progress=progress, name=method)
    info = get_method(method).apply(lm.model, windows, method_config, ctx) or {}
    check_calibrated(lm.model)
    recipe["method_info"] = info
    recipe["timing"] = {"quantize_s": round(time.perf_counter() - t0, 3)}
    return QuantizeResult(lm, recipe)


def evaluate_perplexity(lm: LoadedModel, seqlen: int = 512, corpus: str = data.DEFAULT_EVAL,
                        limit: int | None = None, batch_size: int = 1, progress: bool = True,
                        split: str = "test") -> PerplexityResult:
    """Perplexity on the ``split`` of the evaluation corpus: ``test`` (reported numbers), ``validation``
    (choosing hyper-parameters) or ``all`` (``quant.data.split_bounds``)."""
    check_seqlen(lm, seqlen)
    windows = data.eval_windows(lm.tokenizer, seqlen, corpus, limit=limit, add_bos=lm.add_bos, split=split)
    return perplexity(lm.model, windows, corpus=corpus if corpus in data.CORPORA else "custom",
                      batch_size=batch_size, progress=progress)
