"""farm's layers (docs/architecture.md): cli > orchestrate > work > plan > core, each importing only its own
layer or the ones below, with no import circle, and every module importable in a fresh interpreter.

Imports are read from the source with ast, function-level ones included: a lazy import inside a function
is still a dependency, and lazy imports were what hid the circles this layout removed."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FARM = ROOT / "farm"
LAYERS = ["core", "plan", "work", "orchestrate", "cli"]  # bottom to top


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(FARM.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The farm modules ``module`` imports, anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            # `from ..work import stages` names a module; `from .ids import flatten` a name in one
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        out |= {n for n in names if n == "farm" or n.startswith("farm.")}
    return out - {module}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_farm_module_is_in_a_layer():
    loose = [m for m in _modules() if m != "farm" and _layer(m) is None]
    assert loose == [], f"modules outside the layers {LAYERS}: {loose}"


def test_each_module_imports_only_its_own_layer_or_lower():
    upward = []
    for m, deps in _graph().items():
        for d in deps:
            lm, ld = _layer(m), _layer(d)
            if lm is not None and ld is not None and ld > lm:
                upward.append(f"{m} ({LAYERS[lm]}) imports {d} ({LAYERS[ld]})")
    assert upward == []


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d in graph and d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_below_orchestrate_nothing_talks_to_mlflow():
    """A trial, a stage and a device job run on workers and return results; only the driver writes runs."""
    offenders = []
    for m, p in _modules().items():
        if _layer(m) is not None and _layer(m) < LAYERS.index("orchestrate"):
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{m}: {n}" for n in names if n.split(".")[0] == "mlflow"]
    assert offenders == []


def test_the_graph_sees_the_imports_it_should():
    """The parser itself: known edges of the layout are found (a parser that saw nothing would pass all)."""
    g = _graph()
    assert "farm.cli.printing" in g["farm.cli.deploy_cmds"]
    assert "farm.orchestrate.scheduler" in g["farm.orchestrate.device_tasks"]  # a function-level import
    assert "farm.work.stages" in g["farm.orchestrate.sweep"]  # `from ..work import stages`
    assert "farm.core.ids" in g["farm.plan.spec"]


def test_every_module_imports_in_a_fresh_interpreter():
    mods = sorted((m for m in _modules() if not m.endswith("__main__")),
                  key=lambda m: (_layer(m) if _layer(m) is not None else -1, m))
    code = ("import importlib, sys\nfailed = []\n"
            f"for m in {mods!r}:\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        failed.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert len(mods) >= 30  # every layer's modules, not an empty walk


def test_only_the_layout_object_spells_the_data_folders_names():
    """The data folder's layout (stages/, trials/, attempts/, sweeps/, mlflow.db, mlartifacts/, nightly/,
    reports/) is written down once, in farm/core/layout.py; every other module asks it for a path."""
    import re

    names = ("stages", "trials", "attempts", "sweeps", "mlflow.db", "mlartifacts", "nightly", "reports")
    joined = re.compile(r"""(?:/\s*|os\.path\.join\([^)]*,\s*)["'](%s)["']""" % "|".join(map(re.escape, names)))
    hits = [f"{m}: {x.group(0)}" for m, p in _modules().items() if m != "farm.core.layout"
            for x in joined.finditer(p.read_text(encoding="utf-8"))]
    assert hits == []
    assert joined.search('Path(data_dir) / "stages"') and joined.search('os.path.join(d, "stages")')
