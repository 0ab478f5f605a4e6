"""An artifact as the phone runs it: its scheme plus the ``device`` overrides, keeping every learned range.

A model trained and saved under a reference scheme (``w8a8``) keeps the embedding, the residual stream,
the final norm and the lm_head in float, as the reference simulation does; the phone quantizes them
(``docs/reference.md#simulation-against-device``). :func:`to_device_table` re-simulates the artifact's weights under
``<scheme>:device``: every quantizer whose spec is unchanged keeps the artifact's encoding (the learned
ranges, bit for bit), and only the new or changed ones (the model-level roles; per-channel weights made
symmetric) get min/max ranges, from the artifact's own calibration windows, as RTN would give them.
``farm eval ARTIFACT --device-table`` and ``farm export ARTIFACT --device-table`` use it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import artifact, data
from .scheme import DEVICE_OVERRIDE, get_scheme
from .sim import calibrate_activations, model_device, quantizers, simulate, weight_owners


def device_scheme_name(scheme: str) -> str:
    base = str(scheme)
    if base == "fp":
        raise ValueError("the float model has no device table: quantize it first (e.g. --scheme w8a8)")
    parts = base.split(":", 1)
    if len(parts) == 2 and DEVICE_OVERRIDE in [p.strip() for p in parts[1].split(",")]:
        return base
    return f"{base}{',' if len(parts) == 2 else ':'}{DEVICE_OVERRIDE}"


@torch.no_grad()
def to_device_table(path: str | Path, device: str = "cpu", progress: bool = True):
    """Load the artifact at ``path`` under its scheme + ``device``; returns the LoadedModel (with ``recipe``
    saying where it came from and which quantizers were recalibrated)."""
    src = artifact.load(path, device=device)
    recipe = src.recipe
    old = quantizers(src.model)
    scheme = get_scheme(device_scheme_name(recipe.get("scheme", "fp")))
    from .zoo import load_model

    lm = load_model(str(path), device=device)
    lm.add_bos = src.add_bos
    simulate(lm.model, scheme)
    new = quantizers(lm.model)
    kept = {n for n, q in new.items() if n in old and old[n].spec == q.spec}
    for n in kept:
        new[n].set_qparams(old[n].scale, old[n].offset)
    fresh = sorted(set(new) - kept)
    owners = weight_owners(lm.model)
    for n in fresh:
        if n in owners:  # weights: min/max of the (already clipped and folded) weights
            q = new[n]
            mn, mx = q._reduce(owners[n].effective_weight())
            q.set_range(mn, mx)
    fresh_acts = [n for n in fresh if n not in owners]
    if fresh_acts:
        cal = recipe.get("calibration", {})
        windows = data.calibration_windows(lm.tokenizer, int(cal.get("samples", 32)), int(cal.get("seqlen", 512)),
                                           int(cal.get("seed", 0)), cal.get("corpus", data.DEFAULT_CALIB),
                                           add_bos=lm.add_bos).to(model_device(lm.model))
        # calibrate_activations observes every activation quantizer on the float model; only the fresh ones
        # take the new ranges, the kept ones get the artifact's back
        saved = {n: (new[n].scale, new[n].offset) for n in kept if n not in owners}
        calibrate_activations(lm.model, windows.split(4), progress=progress)
        for n, (s, o) in saved.items():
            new[n].set_qparams(s, o)
    del src
    derived = dict(recipe, scheme=scheme.name, derived_from=recipe.get("content_hash"),
                   device_table={"from_scheme": recipe.get("scheme"), "kept": len(kept), "recalibrated": fresh})
    derived.pop("content_hash", None)  # another model: its own identity
    lm.recipe = derived
    return lm
