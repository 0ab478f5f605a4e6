"""The names farm writes into MLflow and reports read back, each defined once.

This module imports nothing, and ``reports`` imports it and nothing else of farm: a report is built from
the tracking store alone, yet the writer (farm.orchestrate) and the reader (reports) cannot drift apart
on a name. docs/architecture.md says why this is the one exception to "reports imports no farm".
"""

FLOAT_METHOD = "none"  # the method of a float (scheme fp) trial: no method, no calibration

# the tag that says what an MLflow experiment or run is
ROLE = "farm_role"
ROLE_SWEEP = "sweep"  # a sweep's experiment
ROLE_PARENT = "parent"  # the sweep's parent run
ROLE_TRIAL = "trial"  # one execution of a trial
ROLE_NIGHTLY = "nightly"  # the experiment <suite>.nightly
ROLE_NIGHT = "night"  # one night run
TRIAL_ID = "trial_id"  # tag: the trial's id (the hash of its normalized config)
# tag: "fp" or "w8a16" on a trial the sweep added only as a device baseline (not asked for by its grid): a
# reference like FP, so a report does not count it among the contenders
BASELINE = "farm_baseline"

# a device job's numbers in its trial's run: device/<label>/<name>, <label> the sweep's device target
DEVICE_PREFIX = "device/"
PREFILL_MS, PREFILL_CI_LOW, PREFILL_CI_HIGH = "prefill_ms", "prefill_ms_ci_low", "prefill_ms_ci_high"
PREFILL_P90 = "prefill_ms_p90"
DECODE_TOK_S, DECODE_CI_LOW, DECODE_CI_HIGH = "decode_tok_s", "decode_tok_s_ci_low", "decode_tok_s_ci_high"
ENERGY_MJ_PER_TOK = "energy_mj_per_tok"
POWER_MW = "power_mw"
CONTEXT_LOAD_MS = "context_load_ms"  # a phone's context binary load / init time: users wait for it too
# tags
IDENTITY_TAGS = ("name", "kind", "model", "soc", "os_build", "runtime", "runtime_version")
LATENCY_MEANINGFUL = "latency_meaningful"  # "false": the device's times are not latency (an emulator)
PROMPT_LEN = "prompt_len"
LOST = "lost"  # devices of the target lost on the way, with why
ERROR = "error"  # the target could not be measured


def device_key(label: str, name: str) -> str:
    """The MLflow metric or tag key of ``name`` for the device target ``label``."""
    return f"{DEVICE_PREFIX}{label}/{name}"

# a measurement session's ratios (farm.work.measure): device/<label>/<graph>_ratio_<baseline>[_ci_low|_ci_high],
# the median per-round time ratio to the model's FP32 or W8A16 export timed in the same rounds (below 1:
# faster); energy_ratio_<baseline> where the device measures energy
RATIO_GRAPHS = ("prefill", "decode", "energy")
BASELINES = ("fp", "w8a16")
CI_LOW, CI_HIGH = "ci_low", "ci_high"
SAME_GRAPH = "same_graph"  # tag: the other trials whose exports run the same ops (comma-separated short ids)
SESSION = "session"  # tag: the measurement session's cache key (one key: measured together)
CONDITIONS = "conditions"  # tag: the host's CPUs, governor, load and other processes' CPU use, in words
LOADED = "loaded"  # tag: "true" when other work ran beside the measurement
OTHERS_CPU = "others_cpu"  # metric: other processes' CPU use during the session, in cores
REPEATS = "repeats"  # tag: interleaved rounds per graph (the A/B pairs of each ratio)


def ratio_name(graph: str, baseline: str, part: str = "") -> str:
    """``prefill_ratio_fp``, ``decode_ratio_w8a16_ci_low``, ...: see RATIO_GRAPHS."""
    return f"{graph}_ratio_{baseline}" + (f"_{part}" if part else "")
