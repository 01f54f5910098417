"""The import graph, read from the source (imports inside functions count, those for type checkers
alone do not): no module imports one that imports it back, the runtime's rooms import only
downward, and `placement` nothing of `hybrid`."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
# cli -> server -> engine -> runtime -> model -> experts -> quant, the offload package beside the model
RANK = {"hybrid.cli": 6, "hybrid.server": 5, "hybrid.engine": 4, "runtime": 3, "hybrid.model": 2, "hybrid.offload": 2,
        "hybrid.experts": 1, "hybrid.quant": 0}
RUNTIME = ("hybrid.api", "hybrid.settings")  # the composition root and the Python face


def graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for top in ("hybrid", "placement", "bench") for p in (ROOT / top).rglob("*.py")}
    edges = {}
    for name, path in files.items():
        tree, found = ast.parse(path.read_text()), set()
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test).endswith("TYPE_CHECKING") for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        edges[name] = {m for m in found if m in files and m != name}
    return edges


def room(module: str) -> str:
    name = ".".join(module.split(".")[:2])
    return "runtime" if name in RUNTIME else name


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m not in done:
            for t in edges[m]:
                visit(t, path + [m])
            done.add(m)

    for m in edges:
        visit(m, [])


def test_rooms_import_only_downward_and_placement_stays_at_the_bottom():
    edges = graph()
    up = [(m, t) for m, ts in edges.items() for t in ts
          if room(m) in RANK and room(t) in RANK and room(m) != room(t) and RANK[room(m)] <= RANK[room(t)]]
    assert up == []
    assert [(m, t) for m, ts in edges.items() for t in ts if m.startswith("placement") and t.startswith("hybrid")] == []
    assert "hybrid.offload.layout" in edges["hybrid.api"] and "hybrid.experts.choice" in edges["hybrid.offload.layout"]
