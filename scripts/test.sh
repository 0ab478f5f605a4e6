#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q --durations=15 "$@"
