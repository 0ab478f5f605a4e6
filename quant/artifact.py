"""The quantized-model artifact: the one folder that binds quant, farm and devicelab.

Layout (``ARCHITECTURE.md``)::

    model.safetensors, config.json, tokenizer files   float weights, every transformation folded in
    encodings.json                                    every quantizer: bits, symmetry, scale, offset, min, max
    recipe.json                                       scheme, method + hyper-parameters, calibration identity,
                                                      seed, package versions, content hash

Offsets follow our convention ``q = round(x / scale) + offset``; ``aimet_offset`` (= ``-offset``) is the
AIMET/QNN one. Reloading gives the same logits bit for bit: weights are stored in float32 and every
scale/offset is a float32 written as a decimal that round-trips exactly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from .quantizer import minmax_from_qparams
from .scheme import Scheme
from .sim import model_device, quantizers, simulate

FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact folder is missing, incomplete, or would overwrite something."""


def recipe_hash(recipe: dict) -> str:
    """Content hash of a recipe's defining fields (timings, versions and the hash itself excluded)."""
    keep = {k: v for k, v in recipe.items() if k not in ("content_hash", "timing", "versions", "created_at")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encodings_of(model: torch.nn.Module) -> dict:
    scheme: Scheme | None = getattr(model, "mq_scheme", None)
    if scheme is None:
        raise ArtifactError("model is not simulated: nothing to encode")
    out = {"version": FORMAT_VERSION, "scheme": scheme.to_dict(), "activation_encodings": {}, "param_encodings": {}}
    for name, q in quantizers(model).items():
        if not q.calibrated:
            raise ArtifactError(f"quantizer {name} has no range: calibrate before saving")
        mn, mx = minmax_from_qparams(q.scale, q.offset, q.spec)
        entry = {
            "bitwidth": q.spec.bits, "symmetric": q.spec.symmetric, "per_channel": q.spec.per_channel,
            "dtype": "int" if q.spec.symmetric else "uint",
            "scale": q.scale.tolist(), "offset": q.offset.tolist(),
            "aimet_offset": (-q.offset).tolist(), "min": mn.tolist(), "max": mx.tolist(),
        }
        kind = "param_encodings" if name.endswith(".weight") else "activation_encodings"
        out[kind][name] = entry
    return out


def apply_encodings(model: torch.nn.Module, enc: dict, source: str = "encodings") -> None:
    qs = quantizers(model)
    dev = model_device(model)
    stored = {**enc["activation_encodings"], **enc["param_encodings"]}
    missing, extra = sorted(set(qs) - set(stored)), sorted(set(stored) - set(qs))
    if missing or extra:
        raise ArtifactError(f"{source}: encodings do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, q in qs.items():
        e = stored[name]
        q.set_qparams(torch.tensor(e["scale"], dtype=torch.float32, device=dev),
                      torch.tensor(e["offset"], dtype=torch.float32, device=dev))


def save(model: torch.nn.Module, tokenizer, out_dir: str | Path, recipe: dict, overwrite: bool = False) -> Path:
    """Write the artifact atomically: into a temporary sibling folder, renamed into place at the end."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ArtifactError(f"output folder {out} already exists; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = dict(recipe, format_version=FORMAT_VERSION)
    recipe["content_hash"] = recipe_hash(recipe)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "mq_scheme", None) is not None:
            (tmp / "encodings.json").write_text(json.dumps(encodings_of(model)))
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True, default=str))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / "recipe.json").read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not a quantized-model artifact: no recipe.json") from None


def load(path: str | Path, device: str | torch.device = "cpu"):
    """Load an artifact onto ``device``: the simulated model with its encodings, the tokenizer, the recipe.

    Returns a :class:`quant.zoo.LoadedModel` whose ``recipe`` attribute holds ``recipe.json``.
    """
    from .zoo import load_model

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact folder {path} does not exist")
    recipe = read_recipe(path)
    lm = load_model(str(path), device=device)
    lm.add_bos = bool(recipe.get("add_bos", lm.add_bos))
    enc_path = path / "encodings.json"
    if enc_path.exists():
        enc = json.loads(enc_path.read_text())
        simulate(lm.model, Scheme.from_dict(enc["scheme"]))
        apply_encodings(lm.model, enc, str(enc_path))
    elif recipe.get("scheme") != "fp":
        raise ArtifactError(f"{path} has scheme {recipe.get('scheme')!r} but no encodings.json")
    lm.recipe = recipe
    return lm
