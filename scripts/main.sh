#!/usr/bin/env bash
# The main job on the embedded default: sweeps/demo.yaml, i.e. FP, RTN, SmoothQuant and MobileQuant at
# W8A8 on SmolLM2-135M, run on a local Ray instance and tracked in MLflow (runs/farm/), ending with a
# summary table. Sets up .venv if needed. Extra args go to `farm sweep` (e.g. --dry-run).
# A second run does no work; `farm ui` then shows the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
MQ_NO_BROWSER=1 bash scripts/setup.sh  # the report is written, not opened: no chromium needed here
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/farm sweep sweeps/demo.yaml "$@"
