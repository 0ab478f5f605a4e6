"""Zero-shot evaluation through the real lm-evaluation-harness (``lm_eval``), on models in memory.

:func:`run_suite` wraps a loaded model (float, simulated-quantized, or a loaded artifact: all are
``PreTrainedModel`` objects) in lm-eval's ``HFLM`` and runs ``lm_eval.simple_evaluate`` on

* local tasks (:mod:`quant.eval.tasks`), written once into ``$MQFARM_CACHE/lmeval_tasks`` and passed
  to lm-eval as the paths of their YAML files;
* standard lm-eval task names (``wikitext``, ``lambada_openai``, ``arc_challenge``, ``hellaswag``,
  ``mmlu``, ...), passed to lm-eval unchanged; they need their datasets (network or HF cache), and
  when they cannot load, lm-eval's reason comes back as :class:`TaskLoadError`;
* tasks in your own folders of lm-eval YAMLs (``include_path``).

Tokenization follows :mod:`quant.data`: HFLM's ``add_bos_token`` is the model's ``add_bos`` (Gemma
yes, SmolLM2 no). Rolling log-likelihood documents are encoded without special tokens and start from
lm-eval's prefix token (the tokenizer's BOS), so for a BOS model a rolling window is exactly
``[BOS] + tokens``, as our perplexity windows. Metrics come back flat: ``lmeval/<task>/<metric>``
(plus ``lmeval/<task>/n``, ``lmeval/suite_s`` and ``lmeval/suite_cpu_s``).

``lm_eval`` is imported lazily, inside functions: ``import quant`` stays light.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path

from . import tasks as local_tasks

STANDARD_TASKS = ("wikitext", "lambada_openai", "arc_challenge", "hellaswag", "mmlu")
DEFAULT_SUITE = "local"
DEFAULT_MAX_LENGTH = 2048  # the paper's lm-eval max_length
DEFAULT_BATCH_SIZE = 16  # loglikelihood / multiple-choice requests (short sequences)
ROLLING_BATCH_SIZE = 1  # rolling windows are max_length long


def tasks_dir() -> Path:
    from ..zoo import cache_root

    return cache_root() / "lmeval_tasks"


def available_tasks() -> dict[str, str]:
    """Local task names and suites, with a one-line description each."""
    out = {name: f"v{s.version}, {s.size} docs, seed {s.seed}: {s.description}"
           for name, s in local_tasks.TASKS.items()}
    out.update({name: "suite: " + ", ".join(members) for name, members in local_tasks.SUITES.items()})
    return out


def _unknown(names: list[str]) -> ValueError:
    return ValueError(
        f"unknown lm-eval task(s): {', '.join(names)}. Local tasks: {', '.join(local_tasks.TASKS)}; "
        f"suites: {', '.join(local_tasks.SUITES)}. Standard lm-eval tasks (e.g. {', '.join(STANDARD_TASKS)}) "
        "are passed through when lm-eval knows them (`lm_eval ls tasks` lists them); they need their datasets.")


def parse_suite(suite: str | list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Split a suite (``"local"``, ``"mq_lambada,hellaswag"`` or a list) into local and standard task
    names, in order and without repeats. Names that are neither local nor suites are returned as
    standard; :func:`resolve_suite` checks them against lm-eval's task index."""
    items = [s.strip() for s in (suite.split(",") if isinstance(suite, str) else suite)]
    items = [s for s in items if s]
    if not items:
        raise ValueError("empty task suite; " + _unknown([]).args[0].split(". ", 1)[1])
    local, standard = [], []
    for item in items:
        names = local_tasks.SUITES.get(item, (item,))
        for n in names:
            target = local if n in local_tasks.TASKS else standard
            if n not in target:
                target.append(n)
    return local, standard


class TaskLoadError(RuntimeError):
    """A standard lm-eval task could not load its data (offline, missing cache)."""


_TM_CACHE: dict[tuple, object] = {}


def _task_manager(include: list[Path], need_defaults: bool):
    """A TaskManager over ``include`` (+ lm-eval's own tasks), reused per process."""
    from lm_eval.tasks import TaskManager

    key = (tuple(str(Path(p).resolve()) for p in include), need_defaults)
    if key not in _TM_CACHE:
        _TM_CACHE[key] = TaskManager(include_path=list(key[0]) or None, include_defaults=need_defaults)
    return _TM_CACHE[key]  # the index only: tasks are loaded afresh by each simple_evaluate


def resolve_suite(suite: str | list[str], include_path: str | Path | list | None = None):
    """Write the local tasks of ``suite`` and pick the TaskManager: (tasks for ``simple_evaluate``,
    TaskManager). Local tasks are passed as the paths of their YAML files; other names go to the
    TaskManager, which indexes ``include_path`` and, only when a name is found nowhere else, lm-eval's
    own tasks (about 7 s to index, once per process). Raises ``ValueError`` naming the available
    local tasks for names that lm-eval does not know either."""
    local, standard = parse_suite(suite)
    extra = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, Path)) else list(include_path))
    extra = [Path(p) for p in extra]
    own = set(_task_manager(extra, need_defaults=False).all_tasks) if extra else set()
    foreign = [n for n in standard if n not in own]  # must be lm-eval's own tasks
    if foreign:
        known = set(_task_manager([], need_defaults=True).all_tasks)
        missing = [n for n in foreign if n not in known]
        if missing:
            raise _unknown(missing)
    specs = [str(local_tasks.write_task(n, tasks_dir()) / f"{n}.yaml") for n in local]
    return specs + standard, _task_manager(extra, need_defaults=bool(foreign))


class _Quiet:
    """Silence lm-eval's INFO logging (per-task setup lines) unless progress is wanted."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.saved: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            for name in ("lm_eval", "lm-eval", "datasets"):
                lg = logging.getLogger(name)
                self.saved[name] = lg.level
                lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)


def make_lm(lm, batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None):
    """lm-eval's ``HFLM`` over a :class:`quant.zoo.LoadedModel` (its ``.model`` object, not a copy).

    Rolling requests are encoded without special tokens (lm-eval's prefix token, the BOS, starts each
    document), so a BOS model does not see BOS twice; they run ``ROLLING_BATCH_SIZE`` windows at a
    time (each is up to ``max_length`` tokens, with a ``max_length x vocab`` logits row)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.huggingface import eval_logger as hf_logger

    class _MQHFLM(HFLM):
        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            saved = self.add_bos_token, self.batch_size_per_gpu
            self.add_bos_token, self.batch_size_per_gpu = False, min(ROLLING_BATCH_SIZE, saved[1])
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self.add_bos_token, self.batch_size_per_gpu = saved

    max_length = max_length or min(DEFAULT_MAX_LENGTH, getattr(lm, "max_context", 0) or DEFAULT_MAX_LENGTH)
    lm.model.eval()
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # "pretrained is not a str": passing the object is what we mean
    try:
        return _MQHFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size, max_length=max_length,
                       add_bos_token=bool(lm.add_bos), device=str(next(lm.model.parameters()).device))
    finally:
        hf_logger.setLevel(level)


def _flatten(results: dict, out: dict[str, float]) -> None:
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            if not math.isnan(float(value)):
                out[f"lmeval/{task}/{name}"] = float(value)
    for task, n in results.get("n-samples", {}).items():
        out[f"lmeval/{task}/n"] = float(n.get("effective", n.get("original", 0)))


@contextlib.contextmanager
def _no_fork_pool():
    """lm-eval bootstraps stderrs in a ``multiprocessing.Pool`` of forked processes unless
    ``DISABLE_MULTIPROC`` is set. Forking a process that already runs threads (torch's pools, Ray's core
    worker, tqdm's monitor) can copy a lock held by another thread, and the pool's child then never
    starts: a farm trial hung in ``Pool.terminate`` for good. The in-process bootstrap computes the same
    estimator, so it is forced for the call and the variable restored afterwards."""
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old


def run_suite(lm, suite: str | list[str] = DEFAULT_SUITE, limit: int | float | None = None,
              batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
              progress: bool = True, bootstrap_iters: int = 1000,
              include_path: str | Path | list | None = None) -> dict[str, float]:
    """Evaluate ``lm`` (a LoadedModel: float, quantized in place, or ``artifact.load``) on a task suite.

    ``suite``: ``"local"`` (all local tasks), a comma-separated string or a list mixing local task
    names and standard lm-eval task names (and names of tasks in ``include_path``, folders of your own
    lm-eval YAMLs). ``limit``: at most this many documents per task (quick
    looks; a float in (0, 1) is a fraction). Returns ``{"lmeval/<task>/<metric>": value, ...,
    "lmeval/<task>/n": docs, "lmeval/suite_s": wall seconds, "lmeval/suite_cpu_s": CPU seconds}``; stderr values are ``<metric>_stderr``.
    """
    import lm_eval

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    specs, tm = resolve_suite(suite, include_path)
    t0, c0 = time.perf_counter(), time.process_time()
    hflm = make_lm(lm, batch_size=batch_size, max_length=max_length)
    standard = [t for t in specs if not t.endswith(".yaml")]
    with _Quiet(not progress), contextlib.redirect_stdout(sys.stderr), _no_fork_pool():  # lm-eval prints to stdout
        try:
            res = lm_eval.simple_evaluate(model=hflm, tasks=specs, task_manager=tm, limit=limit, num_fewshot=0,
                                          bootstrap_iters=bootstrap_iters, log_samples=False)
        except (ConnectionError, OSError) as e:
            if not standard:
                raise
            raise TaskLoadError(f"lm-eval could not load {', '.join(standard)}: {type(e).__name__}: {e}. "
                                "Standard tasks need their datasets (network access or a filled HF cache); "
                                f"the local tasks ({', '.join(local_tasks.TASKS)}) need neither.") from e
    if res is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    out: dict[str, float] = {}
    _flatten(res, out)
    out["lmeval/suite_s"] = round(time.perf_counter() - t0, 2)
    out["lmeval/suite_cpu_s"] = round(time.process_time() - c0, 2)  # all threads: contention-independent
    return out


def table_rows(metrics: dict[str, float]) -> list[dict]:
    """Rows ``{task, metric, value, n}`` for printing (stderr next to its metric)."""
    rows = []
    for key in sorted(metrics):
        parts = key.split("/")
        if len(parts) != 3 or parts[2] == "n" or parts[2].endswith("_stderr"):
            continue
        _, task, metric = parts
        value = metrics[key]
        err = metrics.get(f"{key}_stderr")
        rows.append({"task": task, "metric": metric,
                     "value": f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else ""),
                     "n": int(metrics.get(f"lmeval/{task}/n", 0))})
    return rows
