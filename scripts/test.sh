#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# One pytest worker per core, at most 4 (each holds models and a Ray instance of its own; memory, not cores,
# is the limit beyond that). A test file stays on one worker (--dist loadfile), so its module fixtures are
# built once. MQ_TEST_WORKERS=0 runs serially.
workers=${MQ_TEST_WORKERS:-$(n=$(nproc); echo $((n < 4 ? n : 4)))}
if [ "$workers" -gt 1 ]; then
  par=(-n "$workers" --dist loadfile)
else
  par=()
fi
exec .venv/bin/python -m pytest -q --durations=25 ${par[@]+"${par[@]}"} "$@"
