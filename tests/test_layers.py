"""The layers the folders promise, checked on the import graph (every import statement, including
those inside functions): the core knows no cluster and no registry, jobs and serving never import
each other, the actors know nothing of the run or the server, and no package reaches into another's
private names. Plus the practical half: the core imports on a machine without Ray or MLflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ["carryon_ray", "carryon_mlflow", "actors", "jobs", "serve", "finetune", "carryon_cli"]
# package -> top-level modules it must never import
FORBIDDEN = {
    "carryon_ray": {"ray", "mlflow", "carryon_mlflow", "actors", "jobs", "serve", "carryon_cli"},
    "carryon_mlflow": {"ray", "actors", "jobs", "serve", "carryon_cli"},
    "actors": {"mlflow", "carryon_mlflow", "jobs", "serve", "carryon_cli"},
    "jobs": {"serve", "carryon_cli"},
    "serve": {"jobs", "actors", "carryon_cli"},
    # the service on top of the core and the producers' client (its jobs embed on the serving
    # replicas, through actors/client.py as a Ray job's pipeline does); serve hosts its routes
    "finetune": {"serve", "jobs", "carryon_cli"},
}
# the one module of a forbidden package a package may import, and why
ALLOWED = {
    # the trainer service's client: an API job's epochs run on the cluster's trainer service by the
    # rule a Ray job's follow (jobs/trainers.py: choose, fit_embedded), never Ray Train or Ray Data
    "finetune": {"jobs.trainers"},
}


def imports(package: str) -> list[tuple[str, int, str, list[str]]]:
    """(file, line, imported module, imported names) for every import in a package."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), node.lineno, a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((str(path.relative_to(ROOT)), node.lineno, node.module, [a.name for a in node.names]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_crosses_a_layer(package):
    bad = [f"{f}:{line} imports {mod}" for f, line, mod, _ in imports(package)
           if mod.split(".")[0] in FORBIDDEN[package] and mod not in ALLOWED.get(package, ())]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_names_across_packages(package):
    ours = set(PACKAGES)
    bad = [f"{f}:{line} takes {names} from {mod}" for f, line, mod, names in imports(package)
           if mod.split(".")[0] in ours - {package} and any(n.startswith("_") and not n.endswith("__") for n in names)]
    for path in sorted((ROOT / package).rglob("*.py")):  # e.g. argparse internals such as parser._actions
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "._actions" in line:
                bad.append(f"{path.relative_to(ROOT)}:{i} reads a private attribute")
    assert not bad, "\n".join(bad)


def test_the_core_imports_without_ray_or_mlflow():
    """A GPU box with only torch and transformers can run the core (bench/gpu_check.py needs it)."""
    modules = sorted(p.stem for p in (ROOT / "carryon_ray").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n"
            "for name in ('ray', 'mlflow'):\n"
            "    sys.modules[name] = None  # any import of them now raises ImportError\n"
            f"for m in {modules!r}:\n"
            "    __import__('carryon_ray.' + m)\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_the_check_bites():
    """The import scan sees imports inside functions too (a layering test that cannot fail is no test)."""
    found = {mod for _, _, mod, _ in imports("carryon_cli")}
    assert {"jobs.customize", "serve.app", "carryon_mlflow.tracking"} <= found


def core_import_graph() -> dict[str, set[str]]:
    """module -> the core modules it imports (every import statement, inside functions too)."""
    mods = {}
    for p in (ROOT / "carryon_ray").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = pkg.split(".")
                target = (".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                          if node.level else node.module or "")
                graph[m] |= {c for c in [target] + [f"{target}.{a.name}" for a in node.names] if c in mods and c != m}
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods and a.name != m}
    return graph


def test_the_core_has_no_import_cycle():
    """A module that needs another lazily to dodge a cycle (adapter.py <-> recycled.py did) hides a
    layering mistake: every core module's imports form a DAG."""
    graph = core_import_graph()
    assert "carryon_ray.recycled" in graph["carryon_ray.kinds"]  # the graph sees relative imports
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_modules_ray_data_tasks_and_the_cache_actor_import_need_no_torch():
    """Ray Data's select/tag/embed-request tasks and the cache actor run in worker processes that
    import these modules at their start; torch there is ~1.5 s of CPU per process (carryon_ray/rows.py)."""
    code = ("import sys\n"
            "import jobs.data, jobs.cache, actors.service, carryon_ray.rows, carryon_ray.data\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr[-3000:]
