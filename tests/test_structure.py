"""The package structure the design card fixes: imports point one way (data_gen ← jaxtrain ← eval) and no module
imports another that imports it back, counting every import, function-local ones included."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_gen", "jaxtrain", "eval")
ALLOWED = {"data_gen": {"data_gen"}, "jaxtrain": {"data_gen", "jaxtrain"}, "eval": set(PACKAGES)}


def _module_of(name: str) -> str | None:
    """The project module (dotted) a `from X import Y` / `import X` name refers to, or None."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    for k in range(len(parts), 0, -1):
        if ROOT.joinpath(*parts[:k]).with_suffix(".py").is_file():
            return ".".join(parts[:k])
    return None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            module = f"{package}.{path.stem}"
            targets = graph.setdefault(module, set())
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                targets.update(m for m in map(_module_of, names) if m and m != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checks_see_a_cycle_and_a_wrong_direction():
    graph = {"jaxtrain.a": {"jaxtrain.b"}, "jaxtrain.b": {"jaxtrain.a", "eval.c"}, "eval.c": set()}
    assert cycles(graph) == [["jaxtrain.a", "jaxtrain.b"]]
    assert _wrong_direction(graph) == ["jaxtrain.b -> eval.c"]


def _wrong_direction(graph):
    return [f"{m} -> {t}" for m, ts in sorted(graph.items()) for t in sorted(ts)
            if t.split(".")[0] not in ALLOWED[m.split(".")[0]]]


def test_imports_point_one_way_without_cycles():
    graph = import_graph()
    assert "jaxtrain.generate" in graph["eval.common"] and "data_gen.shards" in graph["jaxtrain.batches"]
    assert cycles(graph) == []
    assert _wrong_direction(graph) == []


def test_the_model_file_is_the_forward_pass():
    """Decoding's cache lives in jaxtrain.kv_cache and jaxtrain.generate; the model file only hands a layer's
    view of it to attention."""
    source = (ROOT / "jaxtrain" / "model.py").read_text()
    graph = import_graph()
    assert not {"jaxtrain.kv_cache", "jaxtrain.generate"} & graph["jaxtrain.model"]
    assert "init_cache" not in source and "per_layer" not in source and source.count("kv_cache.update(") == 1
