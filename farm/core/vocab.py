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

# a device job's numbers in its trial's run: device/<label>/<name>, <label> the sweep's device target
DEVICE_PREFIX = "device/"
PREFILL_MS, PREFILL_CI_LOW, PREFILL_CI_HIGH = "prefill_ms", "prefill_ms_ci_low", "prefill_ms_ci_high"
PREFILL_P90 = "prefill_ms_p90"
DECODE_TOK_S, DECODE_CI_LOW, DECODE_CI_HIGH = "decode_tok_s", "decode_tok_s_ci_low", "decode_tok_s_ci_high"
ENERGY_MJ_PER_TOK = "energy_mj_per_tok"
POWER_MW = "power_mw"
# tags
IDENTITY_TAGS = ("name", "kind", "model", "soc", "os_build", "runtime", "runtime_version")
LATENCY_MEANINGFUL = "latency_meaningful"  # "false": the device's times are not latency (an emulator)
PROMPT_LEN = "prompt_len"
LOST = "lost"  # devices of the target lost on the way, with why
ERROR = "error"  # the target could not be measured


def device_key(label: str, name: str) -> str:
    """The MLflow metric or tag key of ``name`` for the device target ``label``."""
    return f"{DEVICE_PREFIX}{label}/{name}"
