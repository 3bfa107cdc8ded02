"""The import graph of ntkal/ (module-level and function-level imports, read with ast): no cycles, and the
layers point down (docs/design.md, "Layout"): the posterior is algebra, and nothing below the acquisition
imports it."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ntkal"


def _modules():
    """{module name: path} of every .py file under ntkal/."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _graph():
    """{module: set of ntkal modules it imports anywhere in its file}."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                # `from pkg import sub` imports the submodule pkg.sub
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # `import ntkal.io.read` or a name inside a module: its module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _in(module, *layers):
    return any(module == f"ntkal.{x}" or module.startswith(f"ntkal.{x}.") for x in layers)


def test_the_graph_is_read():
    graph = _graph()
    assert "ntkal.acquisition.pipeline" in graph and "ntkal.posterior.precision" in graph
    assert "ntkal.posterior" in graph["ntkal.acquisition.pipeline"]
    assert "ntkal.acquisition.streams" in graph["ntkal.evaluate"]
    assert "ntkal.io" in graph["ntkal.acquisition.streams"]  # a function-level import counts


def test_no_import_cycles():
    graph = _graph()
    cycles = sorted(m for m in graph if m in _reach(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_posterior_is_algebra():
    graph = _graph()
    for mod in (m for m in graph if _in(m, "posterior")):
        bad = sorted(m for m in _reach(graph, mod) if _in(m, "acquisition", "io", "runstate", "cli", "api", "evaluate"))
        assert not bad, f"{mod} imports {bad}"
        allowed = sorted(m for m in graph[mod] if not (_in(m, "posterior", "errors", "options")
                                                       or m == "ntkal.features.rowblock"))
        assert not allowed, f"{mod} imports {allowed}: the posterior takes only errors, options and RowBlock"


def test_the_posterior_needs_only_torch_numpy_and_the_kernels():
    allowed = {"__future__", "dataclasses", "math", "typing", "numpy", "torch", "ntk_kernels"}
    for path in sorted((PKG / "posterior").glob("*.py")):
        outside = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                outside |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                outside.add(node.module.split(".")[0])
        assert outside <= allowed, f"{path.name} imports {sorted(outside - allowed)}"


def test_nothing_below_imports_the_acquisition():
    graph = _graph()
    for mod in (m for m in graph if _in(m, "posterior", "features", "io", "runstate", "options", "errors")):
        bad = sorted(m for m in _reach(graph, mod) if _in(m, "acquisition", "saved", "api", "cli", "evaluate"))
        assert not bad, f"{mod} imports {bad}"


def test_the_saved_posterior_sits_above_the_acquisition_and_below_the_entry_points():
    graph = _graph()
    assert "ntkal.acquisition.centres" in graph["ntkal.saved"] and "ntkal.saved" in graph["ntkal.cli"]
    bad = sorted(m for m in _reach(graph, "ntkal.saved") if _in(m, "api", "cli", "evaluate"))
    assert not bad, f"ntkal.saved imports {bad}"
    for mod in (m for m in graph if _in(m, "acquisition")):
        assert "ntkal.saved" not in _reach(graph, mod), f"{mod} imports ntkal.saved"
