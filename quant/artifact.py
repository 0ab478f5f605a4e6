"""The quantized-model artifact: the one folder that binds quant, farm and devicelab.

Layout (``docs/artifact.md``)::

    model.safetensors, config.json, tokenizer files   float weights, every transformation folded in
    encodings.json                                    every quantizer: bits, symmetry, scale, offset, min, max
    recipe.json                                       scheme, method + hyper-parameters, calibration identity,
                                                      seed, package versions, numerics version, content hash
    manifest.json                                     bytes and sha256 of every other file, written last

Offsets follow our convention ``q = round(x / scale) + offset``; ``aimet_offset`` (= ``-offset``) is the
AIMET/QNN one. Reloading gives the same logits bit for bit: weights are stored in float32 and every
scale/offset is a float32 written as a decimal that round-trips exactly.

Every load checks the manifest's file sizes; ``verify=True`` (or ``MQFARM_VERIFY=full``) also checks the
sha256 of every file, 0.3-0.7 s for the 538 MB SmolLM2 folder (``docs/artifact.md``). Folders and files
get the modes of the user's umask, as a plain ``mkdir`` would give them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from . import encodings_check, files
from .quantizer import minmax_from_qparams
from .scheme import Scheme
from .sim import model_device, quantizers, simulate, weight_owners

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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
    """Set every quantizer's scale and offset from ``enc``, each entry checked first against the quantizer's
    spec (:mod:`quant.encodings_check`): nothing is applied unless all of them are valid."""
    qs = quantizers(model)
    dev = model_device(model)
    try:
        stored = encodings_check.check_file(enc, source)
    except encodings_check.EncodingError as e:
        raise ArtifactError(str(e)) from None
    missing, extra = sorted(set(qs) - set(stored)), sorted(set(stored) - set(qs))
    if missing or extra:
        raise ArtifactError(f"{source}: encodings do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    channels = {n: m.weight.shape[0] for n, m in weight_owners(model).items() if getattr(m, "weight", None) is not None}
    checked = {}
    for name, q in qs.items():
        try:
            checked[name] = encodings_check.check_entry(name, stored[name], q.spec, channels.get(name), source)
        except encodings_check.EncodingError as e:
            raise ArtifactError(str(e)) from None
    for name, q in qs.items():
        scale, offset = checked[name]
        q.set_qparams(torch.tensor(scale, dtype=torch.float32, device=dev),
                      torch.tensor(offset.copy(), dtype=torch.float32, device=dev))


def save(model: torch.nn.Module, tokenizer, out_dir: str | Path, recipe: dict, overwrite: bool = False) -> Path:
    """Write the artifact atomically: into a temporary sibling folder, swapped into place at the end.
    ``overwrite`` replaces only a folder this tool wrote (:func:`quant.files.check_replaceable`)."""
    out = Path(out_dir)
    try:
        files.check_replaceable(out, overwrite)  # only a folder this tool wrote is ever replaced
    except files.FileCheckError as e:
        raise ArtifactError(str(e)) from None
    recipe = dict(recipe, format_version=FORMAT_VERSION)
    recipe["content_hash"] = recipe_hash(recipe)
    with files.atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "mq_scheme", None) is not None:
            (tmp / "encodings.json").write_text(json.dumps(encodings_of(model)))
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True, default=str))
        files.write_manifest(tmp, MANIFEST)
    return out


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "recipe.json").exists():
        raise ArtifactError(f"{path} is not a quantized-model artifact: no recipe.json")
    try:
        return files.read_json(path / "recipe.json", "recipe")
    except files.FileCheckError as e:
        raise ArtifactError(str(e)) from None


def verify(path: str | Path, full: bool | None = None) -> dict:
    """Check an artifact folder against its ``manifest.json``: sizes, and sha256 with ``full`` (default:
    ``MQFARM_VERIFY=full``). Returns the summary of :func:`quant.files.check_manifest`; raises
    ArtifactError naming the file at fault."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact folder {path} does not exist")
    if not (path / MANIFEST).exists():
        if (path / "recipe.json").exists():
            raise ArtifactError(f"{path} has no {MANIFEST}: it was written before artifacts carried one, so its "
                                "files cannot be checked (write it again with this version)")
        raise ArtifactError(f"{path} is not a quantized-model artifact: no recipe.json")
    try:
        return files.check_manifest(path, MANIFEST, full)
    except files.FileCheckError as e:
        raise ArtifactError(str(e)) from None


def _load_weights(path: Path, device, load_model):
    """The float model of an artifact folder; a damaged checkpoint is an ArtifactError naming its file
    (the manifest's sizes catch a truncation, this a same-size corruption of the header or of the config)."""
    from safetensors import SafetensorError

    from .zoo import ModelLoadError

    try:
        return load_model(str(path), device=device)
    except ModelLoadError as e:
        raise ArtifactError(f"{path}: {e}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        weights = sorted(p.name for p in path.glob("*.safetensors")) or ["model weights"]
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path / weights[0]} cannot be loaded ({type(e).__name__}: {first}); the artifact is "
                            "damaged: `farm verify` checks every file, or write it again") from None


def load(path: str | Path, device: str | torch.device = "cpu", verify_files: bool | None = None):
    """Load an artifact onto ``device``: the simulated model with its encodings, the tokenizer, the recipe.

    The manifest's sizes are checked always, the sha256 of every file with ``verify_files=True`` (default:
    ``MQFARM_VERIFY=full``). An artifact written before manifests existed loads with a warning.
    Returns a :class:`quant.zoo.LoadedModel` whose ``recipe`` attribute holds ``recipe.json``.
    """
    from .zoo import load_model

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact folder {path} does not exist")
    recipe = read_recipe(path)
    if (path / MANIFEST).exists():
        verify(path, verify_files)
    else:
        print(f"warning: {path} has no {MANIFEST} (written before artifacts carried one): its files are not "
              "checked", file=sys.stderr)
    lm = _load_weights(path, device, load_model)
    lm.add_bos = bool(recipe.get("add_bos", lm.add_bos))
    enc_path = path / "encodings.json"
    if enc_path.exists():
        try:
            enc = files.read_json(enc_path, "encodings")
            scheme = Scheme.from_dict(enc["scheme"])
        except files.FileCheckError as e:
            raise ArtifactError(str(e)) from None
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"encodings {enc_path} has no usable 'scheme' entry ({type(e).__name__}: {e})") \
                from None
        if recipe.get("scheme") is not None and scheme.name != recipe.get("scheme"):
            raise ArtifactError(f"encodings {enc_path} are for scheme {scheme.name!r}, its recipe says "
                                f"{recipe.get('scheme')!r}")
        simulate(lm.model, scheme)
        apply_encodings(lm.model, enc, str(enc_path))
    elif recipe.get("scheme") != "fp":
        raise ArtifactError(f"{path} has scheme {recipe.get('scheme')!r} but no encodings.json")
    lm.recipe = recipe
    return lm
