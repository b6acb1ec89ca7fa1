"""The package's import graph has no cycles (module-level and function-level imports alike), and the
engine imports nothing of evaluation: rooms depend one way."""
from __future__ import annotations

import ast
from pathlib import Path

import kvcrush_ov

ROOT = Path(kvcrush_ov.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    import kvcrush_ov.transforms as transforms
    mods = {}
    for base, prefix in ((ROOT, "kvcrush_ov"), (Path(transforms.__file__).resolve().parent, "kvcrush_ov.transforms")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if prefix == "kvcrush_ov" and parts[:1] == ["transforms"]:
                continue  # a worktree's symlink to transforms/: counted under its own prefix
            mods[".".join([prefix, *parts])] = path
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
        if name.startswith("kvcrush_ov.engine"):
            deps = _imports(name, path, set(mods))
            assert not any(d.startswith("kvcrush_ov.eval") for d in deps), (name, deps)
            assert "teacher" not in path.read_text().lower(), name
