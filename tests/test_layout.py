"""The layout of the core: one direction of dependency, no import cycle, cheap start-up, and one
module with the public API for plugin authors.

- ``core`` never imports ``plugins``: not by any ``import`` statement anywhere in a file (AST scan,
  module level and inside functions), and not at run time (every core module imported, the
  registry built, a dry run and a prepare command run, with ``__import__`` refusing ``plugins*``
  for a core importer). The built-ins are reached only through :mod:`core.registry`, which
  imports the package by its name.
- No import cycle inside ``core``, function-level (lazy) imports counted as edges too.
- ``python -m core.run --help``, ``--list-plugins`` and ``--dry-run`` import none of the heavy
  optional dependencies (each plugin imports those where it uses them).
- :mod:`core.api` holds what a third-party plugin needs.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "core"
EXAMPLE_SRC = REPO / "examples" / "specreg-orthogonal" / "src"
#: optional dependencies a start-up must not import (their plugins import them when used).
HEAVY = ("cleanfid", "scipy", "sklearn", "matplotlib", "tensorboard")


def core_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the ``core`` package."""
    modules = {}
    for path in sorted(CORE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, module: str, known: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import statement of the file, at any depth;
    ``from a import b`` gives ``a.b`` when that is one of the ``known`` modules, else ``a``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in known else source, node.lineno))
    return found


def _is_plugins(name: str) -> bool:
    return name == "plugins" or name.startswith("plugins.")


# ---------------------------------------------------------------------------------------------
# core does not depend on plugins
# ---------------------------------------------------------------------------------------------


def test_no_core_module_imports_plugins_anywhere_in_the_file():
    modules = core_modules()
    found = {(str(path.relative_to(REPO)), line, target) for module, path in modules.items()
             for target, line in imports_of(path, module, modules) if _is_plugins(target)}
    offenders = [f"{file}:{line}: imports {target}" for file, line, target in sorted(found)]
    assert not offenders, ("core must not import the plugins package (reach built-ins through "
                           "core.registry):\n" + "\n".join(offenders))


_GUARDED_RUN = textwrap.dedent('''
    import builtins, contextlib, io, json, pkgutil, sys, traceback

    refused = []
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__") or ""
        if level == 0 and (importer == "core" or importer.startswith("core.")) \\
                and (name == "plugins" or name.startswith("plugins.")):
            refused.append(f"{importer} imports {name}")
            raise ImportError(f"refused: {importer} imports {name} (core must not import plugins)")
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded_import
    report = {"refused": refused, "failed": {}, "results": {}}

    def step(label, action):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                report["results"][label] = action()
        except SystemExit as exc:
            report["results"][label] = exc.code
        except BaseException:
            report["failed"][label] = traceback.format_exc(limit=4)[-1500:]

    import core
    for info in pkgutil.walk_packages(core.__path__, "core."):
        if not info.name.endswith("__main__"):
            step(info.name, lambda name=info.name: bool(__import__(name)))

    def registry():
        from core.registry import get_registry
        return sorted(get_registry().regularizers)

    step("registry", registry)
    step("prepare", lambda: __import__("core.prepare").prepare.main(["no_such_dataset_xyz"]))
    step("dry-run", lambda: __import__("core.run").run.main(["zoo/quickstart.toml", "--dry-run"]))
    print(json.dumps(report))
''')


def test_core_runs_with_plugin_imports_refused_and_reaches_builtins_through_the_registry():
    """At run time too: with ``__import__`` refusing ``plugins*`` to every core module, importing
    every core module, building the registry (the built-ins by name), a ``--dry-run`` and a
    ``core.prepare`` command all work."""
    out = subprocess.run([sys.executable, "-c", _GUARDED_RUN], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not report["refused"], "core imported plugins at run time:\n" + "\n".join(
        sorted(set(report["refused"])))
    assert not report["failed"], "\n".join(f"{k}:\n{v}" for k, v in report["failed"].items())
    assert "sn" in report["results"]["registry"]  # the built-ins, reached through the registry
    assert report["results"]["prepare"] == 2  # an unknown dataset: a clear error, exit 2
    assert report["results"]["dry-run"] in (0, None)


# ---------------------------------------------------------------------------------------------
# no import cycle inside core
# ---------------------------------------------------------------------------------------------


def import_graph() -> dict[str, dict[str, int]]:
    """core module -> {core module it imports: first line}, lazy imports included. Importing
    ``core.p.q`` from outside the package ``core.p`` runs ``core/p/__init__.py`` first: an edge
    to ``core.p`` too."""
    modules = core_modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, path in modules.items():
        for target, line in imports_of(path, module, modules):
            parts = target.split(".")
            for depth in range(2, len(parts) + 1):  # core.p, core.p.q, ... (not core itself)
                name = ".".join(parts[:depth])
                inside = module == name or module.startswith(name + ".")
                if name in modules and not inside:
                    graph[module].setdefault(name, line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_cycle(graph: dict[str, dict[str, int]], start: str) -> list[str]:
    """The modules of a shortest import cycle through ``start`` (``[start, ..., start]``)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to ``start``
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return []


def readable(graph: dict[str, dict[str, int]], chain: list[str]) -> str:
    """``a (line 3) -> b (line 10) -> a``: each module with the line of its import."""
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(chain, chain[1:])) + \
        f" -> {chain[-1]}"


def cycles_of(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through each module of the component, each cycle once."""
    seen, chains = set(), []
    for module in component:
        chain = shortest_cycle(graph, module)[:-1]
        first = chain.index(min(chain))
        chain = chain[first:] + chain[:first]  # the same cycle from another module: once
        if tuple(chain) not in seen:
            seen.add(tuple(chain))
            chains.append(readable(graph, chain + chain[:1]))
    return chains


def test_no_import_cycle_inside_core_lazy_imports_included():
    graph = import_graph()
    cycles = [f"among {', '.join(c)}:\n    " + "\n    ".join(cycles_of(graph, c))
              for c in strongly_connected(graph)]
    assert not cycles, ("import cycles inside core (each module with the line where it imports "
                        "the next):\n" + "\n".join(cycles))


def test_the_cycle_finder_reports_each_cycle_as_a_chain():
    graph = {"a": {"b": 3}, "b": {"c": 10, "a": 7}, "c": {"a": 42}, "d": {"a": 1}, "e": {}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert cycles_of(graph, ["a", "b", "c"]) == ["a (line 3) -> b (line 7) -> a",
                                                 "a (line 3) -> b (line 10) -> c (line 42) -> a"]


# ---------------------------------------------------------------------------------------------
# start-up imports no heavy optional dependency
# ---------------------------------------------------------------------------------------------


_HEAVY_AFTER = textwrap.dedent('''
    import json, runpy, sys
    args, heavy_names = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
    sys.argv = ["core.run", *args]
    try:
        runpy.run_module("core.run", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    heavy = sorted({m.split(".")[0] for m in sys.modules} & heavy_names)
    print(json.dumps({"code": code, "heavy": heavy}))
''')


@pytest.mark.parametrize("args", [["--help"], ["--list-plugins"],
                                  ["zoo/quickstart.toml", "--dry-run"]],
                         ids=["help", "list-plugins", "dry-run"])
def test_start_up_imports_no_heavy_optional_dependency(args):
    out = subprocess.run([sys.executable, "-c", _HEAVY_AFTER, json.dumps(args), json.dumps(HEAVY)],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None), out.stdout[-2000:]
    assert result["heavy"] == [], (f"python -m core.run {' '.join(args)} imported "
                                   f"{', '.join(result['heavy'])}: import them where they are used")


# ---------------------------------------------------------------------------------------------
# the public API for plugin authors
# ---------------------------------------------------------------------------------------------


def test_everything_in_core_api_all_exists_and_is_the_defining_module_s_object():
    api = importlib.import_module("core.api")
    assert api.__doc__ and len(api.__all__) == len(set(api.__all__))
    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert not missing, f"core.api.__all__ names what it does not define: {missing}"
    for name in api.__all__:
        obj = getattr(api, name)
        origin = getattr(obj, "__module__", None)
        if origin and origin.startswith("core.") and origin != "core.api":
            assert getattr(importlib.import_module(origin), name, obj) is obj, name
        assert name in api.__doc__, f"core.api's docstring (the plugin author's map) lacks {name}"
    for required in ("hookimpl", "Regularizer", "Architecture", "Loss", "Metric", "Dataset",
                     "MetricResult", "EvaluationContext", "frozen_state", "state_updates_enabled",
                     "weight_layers", "weight_matrix", "raw_weight", "parametrizations_of",
                     "LAYER_TYPES", "thin_svd", "singular_values", "SpecregError"):
        assert required in api.__all__, required


def example_core_imports() -> list[tuple[str, str, str]]:
    """``(file, core module, name)`` of each name the example plugin's source imports from core."""
    found = []
    for path in sorted(EXAMPLE_SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("core"):
                found += [(path.name, node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("core") for a in node.names), path
    return found


def test_the_example_plugin_finds_everything_it_imports_from_core_in_core_api():
    api = importlib.import_module("core.api")
    needed = example_core_imports()
    assert needed  # the example does import from core
    for file, module, name in needed:
        assert name in api.__all__, f"{file} imports {name} from {module}: not in core.api"
        assert getattr(api, name) is getattr(importlib.import_module(module), name)


def test_the_example_plugin_works_with_core_api_imports_only(tmp_path):
    """A copy of examples/specreg-orthogonal whose every ``from core.X import`` reads
    ``from core.api import``: it imports, registers and computes its penalty."""
    copy = tmp_path / "src"
    for path in EXAMPLE_SRC.rglob("*"):
        target = copy / path.relative_to(EXAMPLE_SRC)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".py":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(re.sub(r"^(\s*)from core\.\w+ import", r"\1from core.api import",
                                     path.read_text(), flags=re.M))
        elif "egg-info" not in str(path):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    assert "from core.api import" in (copy / "specreg_orthogonal" / "orthogonal.py").read_text()
    code = textwrap.dedent('''
        import torch, specreg_orthogonal as plugin
        from torch import nn
        assert plugin.__file__.startswith(sys.argv[1]), plugin.__file__
        names = []
        plugin.register_regularizers(lambda name, cls: names.append((name, cls)))
        assert [n for n, _ in names] == ["orthogonal", "r2"], names
        name, cls = names[0]
        torch.manual_seed(0)
        net = cls().apply(nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)))
        term = cls().weight_penalty(net)
        assert torch.isfinite(term) and term > 0
        print(name)
    ''')
    out = subprocess.run([sys.executable, "-c", "import sys\n" + code, str(copy)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), str(REPO)])})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "orthogonal"


def test_a_broken_optional_dependency_breaks_only_the_plugins_that_use_it():
    """With clean-fid and scipy unimportable, every built-in still registers and the quickstart's
    dry run works; only computing a score that needs them fails."""
    code = textwrap.dedent('''
        import sys
        sys.modules["cleanfid"] = None  # import cleanfid -> ImportError
        sys.modules["scipy"] = None
        from core.registry import get_registry
        registry = get_registry()
        assert {"fid", "is", "modes", "digits_fid"} <= set(registry.metrics), sorted(registry.metrics)
        from core.run import main
        assert main(["zoo/quickstart.toml", "--dry-run"]) in (0, None)
        from plugins.metrics.fid import fid_from_statistics
        import numpy as np
        try:
            fid_from_statistics(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
        except ImportError:
            print("fid needs clean-fid")
    ''')
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "fid needs clean-fid"


def test_the_inception_url_kept_to_avoid_importing_clean_fid_is_clean_fid_s():
    from cleanfid.downloads_helper import inception_url

    from plugins.metrics.inception import CLEANFID_INCEPTION_URL
    assert CLEANFID_INCEPTION_URL == inception_url
