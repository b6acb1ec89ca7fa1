"""The package's import graph has no cycles (module-level and function-level imports alike), and its
three parts depend one way: core (engine, policies, transforms, configs) imports neither api (pipelines,
engine loop, native backend, server) nor tools (eval, benchmarks, preparation, demo); api does not
import tools; only the package root and cli sit above all three."""
from __future__ import annotations

import ast
from pathlib import Path

import kvcrush_ov

ROOT = Path(kvcrush_ov.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        mods[".".join(["kvcrush_ov", *parts])] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a package importing its own submodules
                out.add(t)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_engine_knows_no_evaluation():
    mods = _modules()
    for name, path in mods.items():
        if name.startswith("kvcrush_ov.core.engine"):
            deps = _imports(name, path, set(mods))
            assert not any(d.startswith("kvcrush_ov.tools.eval") for d in deps), (name, deps)
            assert "teacher" not in path.read_text().lower(), name


PARTS = ("core", "api", "tools")
ALLOWED = {"core": {"core"}, "api": {"core", "api"}, "tools": {"core", "api", "tools"}}


def _part(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PARTS else None


def test_three_parts_depend_one_way():
    mods = _modules()
    assert {_part(n) for n in mods} == {None, *PARTS}
    loose = sorted(n for n in mods if _part(n) is None)
    assert loose == ["kvcrush_ov", "kvcrush_ov.__main__", "kvcrush_ov.cli"], loose
    assert "kvcrush_ov.core.transforms" in mods and "kvcrush_ov.core.transforms.paged" in mods
    for name, path in mods.items():
        part = _part(name)
        if part is None:
            continue
        for dep in _imports(name, path, set(mods)):
            assert _part(dep) in ALLOWED[part], f"{name} ({part}) imports {dep} ({_part(dep)})"
