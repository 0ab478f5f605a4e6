"""Package boundaries (docs/architecture.md): quant imports no Ray, MLflow or devicelab; devicelab no quant,
farm, Ray or MLflow; reports reads MLflow only (no quant, devicelab, Ray or farm, except farm.core.vocab:
the names farm writes into MLflow, in a module that imports nothing).

Checked twice: every submodule of the package imported in a fresh interpreter (walked with pkgutil, so a
package ``__init__`` that imports nothing hides nothing), and every import statement of its source read
with ast, function-level ones included (a lazy import is still a dependency, only a later one)."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "quant": {"ray", "mlflow", "devicelab", "farm", "adbutils", "qai_hub", "onnxruntime"},
    "devicelab": {"quant", "farm", "ray", "mlflow"},
    "reports": {"quant", "devicelab", "ray", "farm"},
}
# the shared vocabulary of writer and reader; farm/__init__ and farm/core/__init__ are docstrings only
ALLOWED = {"reports": {"farm", "farm.core", "farm.core.vocab"}}


def _forbidden(pkg: str, module: str) -> bool:
    return module.split(".")[0] in FORBIDDEN[pkg] and module not in ALLOWED.get(pkg, set())


def _submodules(pkg: str) -> list[str]:
    out = []
    for f in sorted((ROOT / pkg).rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def _loaded_after_importing_all(pkg: str) -> tuple[list[str], set[str]]:
    code = ("import importlib, pkgutil, sys\n"
            f"pkg = importlib.import_module({pkg!r})\n"
            f"names = [{pkg!r}] + [m.name for m in pkgutil.walk_packages(pkg.__path__, {pkg!r} + '.')\n"
            "                      if not m.name.endswith('__main__')]\n"
            "for n in names:\n    importlib.import_module(n)\n"
            "print(' '.join(names))\nprint(' '.join(sorted(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    walked, loaded = r.stdout.splitlines()[-2:]
    return walked.split(), set(loaded.split())


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_importing_every_submodule_loads_nothing_forbidden(pkg):
    walked, loaded = _loaded_after_importing_all(pkg)
    assert sorted(walked) == _submodules(pkg)  # the walk reached every file of the package
    assert sorted(m for m in loaded if _forbidden(pkg, m)) == []


def _imported_modules(path: Path) -> dict[str, int]:
    """Every absolute import of the file (module name -> first line), anywhere in its body."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.setdefault(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.setdefault(node.module, node.lineno)
    return out


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_no_source_line_imports_anything_forbidden(pkg):
    bad = []
    for mod in _submodules(pkg):
        path = Path(importlib.util.find_spec(mod).origin)
        bad += [f"{path.relative_to(ROOT)}:{line}: imports {name}"
                for name, line in _imported_modules(path).items() if _forbidden(pkg, name)]
    assert bad == []


def test_the_source_check_sees_function_level_imports():
    """The reader itself: farm.orchestrate.device_tasks imports Ray only inside functions."""
    assert "ray" in _imported_modules(ROOT / "farm" / "orchestrate" / "device_tasks.py")
    assert _forbidden("reports", "farm.orchestrate.tracking") and not _forbidden("reports", "farm.core.vocab")


def test_the_vocabulary_imports_nothing():
    """What reports may import of farm stays free of farm's heavy parts (and of everything else)."""
    assert _imported_modules(ROOT / "farm" / "core" / "vocab.py") == {}
