"""The import direction of DESIGN.md, checked on the source (every import, function-level ones too):
lower layers never import higher ones, and no two modules import each other, directly or in a circle."""

import ast
from pathlib import Path

import domainfusion_bench

ROOT = Path(domainfusion_bench.__file__).parent
# protocol, registry <- data, networks, diffusion <- algorithms <- training <- sweep, launchers, ... <- cli
LAYERS = {
    "errors": 0, "registry": 0, "protocol": 0, "paths": 0, "hparams": 0, "costs": 0, "runfiles": 0,
    "data": 1, "networks": 1, "diffusion": 1,
    "algorithms": 2,
    "training": 3, "catalog": 3, "shipping": 3,
    "sweep": 4, "frames": 4, "selection": 4, "collect": 4, "tables": 4, "report": 4, "launchers": 5, "bench": 5,
    "cli": 6, "__main__": 7,
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("domainfusion_bench"):
                base = node.module[len("domainfusion_bench"):].lstrip(".")
                targets = [base] + [f"{base}.{a.name}".lstrip(".") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name[len("domainfusion_bench"):].lstrip(".") for a in node.names
                           if a.name.startswith("domainfusion_bench")]
            deps |= {t for t in targets if t in modules and t and t != name}
        graph[name] = deps
    return graph


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_module_has_a_layer():
    assert all(m.split(".")[0] in LAYERS for m in _graph() if m != "__init__")


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} -> {d}" for m, deps in _graph().items() if m != "__init__" for d in deps
              if _layer(d) > _layer(m)]
    assert upward == []


def test_named_directions():
    g = _graph()
    assert "cli" not in g["launchers"]
    assert not any(d.startswith("training") for m, deps in g.items() if m.startswith("data") for d in deps)
    assert not ("report" in g["tables"] and "tables" in g["report"])
    # selection is a pure function of records: it reads frames, never the collector (collect may use it)
    assert not any(d.startswith("collect") for m, deps in g.items() if m.startswith("selection") for d in deps)


def test_no_import_cycles():
    # a package's __init__ re-exporting its own submodules is how packages work, not a cycle
    g = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in _graph().items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []
