"""quant: MobileQuant-style quantization of small LLMs, as a pure torch + transformers library.

No Ray, MLflow or device code here (``tests/test_boundaries.py``). Typical use::

    from quant import load_model, quantize, CalibConfig, evaluate_perplexity, artifact
    lm = load_model("smollm2-135m")
    res = quantize(lm, scheme="w8a8", method="rtn", calib=CalibConfig(samples=32, seqlen=512))
    print(evaluate_perplexity(lm, seqlen=512, limit=20).ppl)
    artifact.save(lm.model, lm.tokenizer, "out/w8a8-rtn", res.recipe)
"""

__version__ = "0.1.0"

from .numerics import NUMERICS_VERSION  # noqa: E402  (bump it when a change moves any number)
from . import artifact  # noqa: E402
from .api import CalibConfig, evaluate_perplexity, quantize  # noqa: E402
from .scheme import SCHEMES, get_scheme  # noqa: E402
from .zoo import ZOO, load_model  # noqa: E402

__all__ = ["NUMERICS_VERSION", "artifact", "CalibConfig", "evaluate_perplexity", "quantize", "SCHEMES", "get_scheme",
           "ZOO", "load_model"]
