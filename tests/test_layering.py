"""The library's layering, read from its source: every ``import`` in framework/, those inside functions too.

Floors, from the ground up (DESIGN.md decision 10): a module may import its own package and any lower floor,
never a higher one, and no two modules import each other through a chain (a cycle). The library never
imports its entry points (launch/, converters/), benchmarks or tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ["runtime", "config", "models", "peft", "data", "checkpoint", "inference", "planner", "training"]
OUTSIDE = ("launch", "converters", "bench", "tests")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved), at any depth of the file.
    ``from pkg import name`` counts as ``pkg.name`` where that is a module, else as ``pkg``."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT / Path(*sub.split(".")) / "__init__.py").is_file()
                found.add(sub if is_module else base)
    return found


def graph(files: dict[str, set[str]]) -> dict[str, set[str]]:
    """module -> the framework modules it imports (names that are not modules, e.g. classes, dropped)."""
    return {m: {t for t in imported if t in files and t != m} for m, imported in files.items()}


def floor_of(module: str) -> int:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else -1


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if floor_of(a) >= 0 and floor_of(b) > floor_of(a))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def framework_graph() -> dict[str, set[str]]:
    files = {module_name(p): imports_of(p) for p in sorted((ROOT / "framework").rglob("*.py"))}
    return graph(files)


def test_every_package_has_a_floor():
    packages = {p.name for p in (ROOT / "framework").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(FLOORS), f"packages without a floor in FLOORS: {sorted(packages - set(FLOORS))}"


def test_no_import_goes_up_a_floor():
    up = upward_imports(framework_graph())
    assert not up, "imports from a lower floor to a higher one (floors: " + " -> ".join(FLOORS) + "):\n  " + \
        "\n  ".join(up)


def test_no_cycle_between_packages():
    edges = framework_graph()
    packages: dict[str, set[str]] = {}
    for a, targets in edges.items():
        pa = ".".join(a.split(".")[:2])
        packages.setdefault(pa, set()).update(".".join(b.split(".")[:2]) for b in targets)
    for p, ts in packages.items():
        ts.discard(p)
    assert not cycles(packages), f"packages importing each other in a cycle: {cycles(packages)}"


def test_no_cycle_between_modules():
    assert not cycles(framework_graph()), f"modules importing each other in a cycle: {cycles(framework_graph())}"


def test_library_never_imports_entry_points_benchmarks_or_tests():
    bad = sorted(f"{module_name(p)} -> {t}" for p in (ROOT / "framework").rglob("*.py") for t in imports_of(p)
                 if t.split(".")[0] in OUTSIDE)
    assert not bad, "\n".join(bad)


def test_the_checks_find_what_they_look_for():
    """The checker itself: a made-up upward import and a made-up cycle are found (so a pass means something)."""
    edges = {"framework.models.a": {"framework.training.b"}, "framework.training.b": {"framework.models.a"}}
    assert upward_imports(edges) == ["framework.models.a -> framework.training.b"]
    assert cycles(edges) == [["framework.models.a", "framework.training.b"]]
    tmp = ROOT / "framework" / "models" / "config.py"
    assert "framework.runtime.errors" in imports_of(ROOT / "framework" / "checkpoint" / "model_checks.py")
    assert module_name(tmp) == "framework.models.config"


#: What a function may import when it runs rather than its module when it loads: dependencies that take
#: seconds to import (megatron-core ~4 s; validation, data preparation and --help run without it) or that
#: are optional (Transformer Engine, W&B, psutil, bitsandbytes, the HF libraries used for conversion).
LAZY = ("megatron", "transformer_engine", "transformers", "tokenizers", "wandb", "psutil", "bitsandbytes",
        "peft", "trl")
#: our modules that import megatron-core when they load (building on its classes)
LAZY_OWN = ("framework.models.attention", "framework.models.parallel_block", "framework.training.engine")


def imports_inside_functions(source: str) -> list[tuple[int, str]]:
    """(line, module) of each import in a function body of ``source`` that a ``try`` does not guard."""
    found = []

    class Visitor(ast.NodeVisitor):
        depth = guarded = 0

        def visit_FunctionDef(self, node):
            self.depth += 1
            self.generic_visit(node)
            self.depth -= 1

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Try(self, node):
            self.guarded += 1
            self.generic_visit(node)
            self.guarded -= 1

        def visit_Import(self, node):
            if self.depth and not self.guarded:
                found.extend((node.lineno, a.name) for a in node.names)

        def visit_ImportFrom(self, node):
            if self.depth and not self.guarded:
                found.append((node.lineno, "." * node.level + (node.module or "")))

    Visitor().visit(ast.parse(source))
    return found


def test_imports_inside_functions_are_only_the_slow_or_optional_ones():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {m} inside a function; import it at the top of the module"
           for p in sorted((ROOT / "framework").rglob("*.py")) for line, m in imports_inside_functions(p.read_text())
           if m.split(".")[0] not in LAZY and m not in LAZY_OWN]
    assert not bad, "\n".join(bad)
    made_up = "import os\ndef f():\n    import json\n    try:\n        import wandb\n    except ImportError:\n        pass\n"
    assert imports_inside_functions(made_up) == [(3, "json")]  # the checker finds what it looks for
