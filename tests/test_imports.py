"""What importing the kit costs: the configs load no model library, and no kit module imports itself
round a circle (imports inside functions included: that is where circles hide)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"difflora_kit": ROOT / "difflora_kit", "difflora_kit.kernels": ROOT / "kernels"}  # pyproject's package-dir
HEAVY = ("torch", "bitsandbytes", "diffusers", "transformers", "peft", "triton")


def test_building_the_configs_imports_no_model_library():
    code = ("import sys; from difflora_kit.config import TrainConfig, SampleConfig; "
            "TrainConfig(); TrainConfig(preset_mode='adapter'); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", f"building a TrainConfig imported {out.stdout.strip()}"


def kit_modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the kit (kernels/ as difflora_kit.kernels)."""
    out = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            out[".".join((package, *parts[: -1 if parts[-1] == "__init__" else None]))] = path
    return out


def _known(name: str, modules) -> str | None:
    """The kit module `name` is, or the innermost kit module it is an attribute of (None: not the kit's)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(source: str, module: str, is_package: bool, modules) -> set[str]:
    """The kit modules that `module` imports anywhere in `source`: at the top, in functions, in branches."""
    here = module if is_package else module.rpartition(".")[0]  # what "from . import" means
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {_known(alias.name, modules) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here.rsplit(".", node.level - 1)[0] if node.level else ""  # each extra dot: one package up
            target = ".".join(p for p in (base, node.module) if p)
            found |= {_known(f"{target}.{alias.name}", modules) for alias in node.names}
    return found - {None, module}


def import_graph() -> dict[str, set[str]]:
    """{kit module: the kit modules it imports}."""
    modules = kit_modules()
    return {m: imports_of(path.read_text(), m, path.name == "__init__.py", modules) for m, path in modules.items()}


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan): each holds a circle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while v not in component:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def a_circle(graph: dict[str, set[str]], component: set[str]) -> str:
    """'a -> b -> a': a shortest circle through the component's first module, for the error message."""
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & component):
            if w == start:
                return " -> ".join(m.removeprefix("difflora_kit.") for m in path + [w])
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"{component} is not a tangle")


def test_imports_inside_functions_and_relative_imports_are_read():
    modules = {"difflora_kit": True, "difflora_kit.a": False, "difflora_kit.b": False, "difflora_kit.toy": True,
               "difflora_kit.toy.c": False}
    source = "import torch\nfrom . import a\ndef f():\n    from .b import g\n    import difflora_kit.toy.c\n"
    assert imports_of(source, "difflora_kit.x", False, modules) == {"difflora_kit.a", "difflora_kit.b",
                                                                     "difflora_kit.toy.c"}
    assert imports_of("from ..a import h\nfrom . import c", "difflora_kit.toy.d", False, modules) == {
        "difflora_kit.a", "difflora_kit.toy.c"}
    assert imports_of("from . import __version__", "difflora_kit.x", False, modules) == {"difflora_kit"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert tangles(graph) == [{"a", "b", "c"}] and a_circle(graph, {"a", "b", "c"}) == "a -> b -> c -> a"


def test_the_kit_has_no_import_circle():
    graph = import_graph()
    assert "difflora_kit.kohya" in graph["difflora_kit.lora"] and "difflora_kit.lora" in graph["difflora_kit.preset"]
    assert graph["difflora_kit.kohya"] == set(), "kohya.py is a pure key converter: it imports nothing of the kit"
    assert graph["difflora_kit.config"] == set(), "config.py imports nothing of the kit (so no model library)"
    circles = [a_circle(graph, c) for c in tangles(graph)]
    assert not circles, "import circles: " + "; ".join(circles)
