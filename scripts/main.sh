#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M in FP, W8A16, W8A8 and W4A8 (RTN), perplexity on the
# first 40 evaluation windows, as a table. Sets up .venv if needed. Extra args go to bench/ppl_table.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/python bench/ppl_table.py --limit 40 "$@"
