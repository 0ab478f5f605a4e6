"""The numerics version: which arithmetic made a number.

``NUMERICS_VERSION`` changes whenever a change to ``quant`` moves any result (a perplexity, a calibrated
range, a trained weight) on the same inputs: a rounding rule, a kernel, a default range, the order of
a fold. It is part of every recipe (``numerics_version``), of farm's trial ids and of the quantize
stage's cache key, so a result computed by older arithmetic is never taken for a current one.

``tests/test_numerics.py`` pins a small result per version; when it fails, either the change was not
meant to move numbers (fix it) or it was (bump the version here, add the new pins, say why below).

History:

1. The first numbered version (2026-11-30): the arithmetic after commit f3705c9 (evaluation-path fake
   quantization divides by the scale instead of multiplying by its reciprocal, as ONNX QuantizeLinear
   does), which moved the demo's W8A8 RTN from 48.18 to 48.24. Results made before carry no version. The
   README's older 48.02 (commit 9feeed8) is not a code change: that code gives 48.18 here too; the machine
   it ran on differed (``docs/numerics.md``).

2. The device table (2026-12-03): ``<scheme>:device`` runs the norms' outputs and down_proj's input (and
   o_proj's where its weights are per-channel) at 16 bits, which is what the HTP runs (``docs/deploy.md``),
   so every ``:device`` result moved (SmolLM2 3 layers, W8A8: the logits' relative distance to the float
   model is now 0.022, against w8a8's 0.092). The reference schemes compute exactly what they did: their pins are
   version 1's. The norm is unchanged (``x * rsqrt(mean(x^2) + eps) * g``); the export now writes it as
   ONNX RMSNormalization, which agrees with it within float32 rounding.

The version names the code's arithmetic, not the machine's: other CPUs sum in other orders, so pins are
kept per machine class.
"""

NUMERICS_VERSION = 2


def mismatch(found) -> str | None:
    """Why a result made under numerics version ``found`` is not comparable to this code's; None when it is."""
    if found is None or found == "":
        return f"made before numerics versions existed (this code is version {NUMERICS_VERSION})"
    try:
        found = int(found)
    except (TypeError, ValueError):
        return f"numerics version {found!r} is not a number (this code is version {NUMERICS_VERSION})"
    if found != NUMERICS_VERSION:
        return f"made with numerics version {found} (this code is version {NUMERICS_VERSION})"
    return None
