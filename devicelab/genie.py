"""Genie's ``genie-t2t-run`` on a phone: its command line and its ``--profile`` JSON."""

from __future__ import annotations

import shlex

from .protocol import DeviceError

GENIE_CMD = "LD_LIBRARY_PATH={dir} ADSP_LIBRARY_PATH={dir} {dir}/genie-t2t-run -c {config} -p {prompt} --profile {profile}"


def genie_command(remote_dir: str, config: str, prompt_len: int, runs: int, template: str = "") -> tuple[str, list[str]]:
    """One shell line running ``runs`` generations; returns it and the profile files it writes."""
    prompt = shlex.quote(" ".join(["hello"] * prompt_len))
    outputs = [f"out/profile_{i}.json" for i in range(runs)]
    body = (template or GENIE_CMD).format(dir=remote_dir, config=config, prompt=prompt, profile="out/profile_$i.json")
    return (f"cd {remote_dir} && rm -rf out && mkdir -p out && "
            f"for i in $(seq 0 {runs - 1}); do {body} > out/stdout_$i.txt || exit $?; done"), outputs


def parse_genie_profile(profile: dict) -> dict:
    """TTFT (ms), tokens/s and token counts from a ``genie-t2t-run --profile`` JSON (layout:
    tests/data/genie_profile.json): the last ``GenieDialog_query`` event of the ``dialog`` component."""
    for comp in profile.get("components", []):
        if comp.get("type") != "dialog":
            continue
        queries = [e for e in comp.get("events", []) if e.get("type") == "GenieDialog_query"]
        if queries:
            q = queries[-1]

            def value(key):
                if key not in q or "value" not in q[key]:
                    raise DeviceError(f"Genie profile: GenieDialog_query has no {key!r}")
                return q[key]["value"]

            ttft = value("time-to-first-token")
            unit = q["time-to-first-token"].get("unit", "us")
            return {"ttft_ms": ttft / 1000.0 if unit == "us" else float(ttft),
                    "tokens_per_s": float(value("token-generation-rate")),
                    "prompt_tokens": int(value("num-prompt-tokens")),
                    "generated_tokens": int(value("num-generated-tokens"))}
    raise DeviceError("Genie profile has no dialog component with a GenieDialog_query event")
