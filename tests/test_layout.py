"""The package's layout rules (DESIGN.md section 3), read from the source with `ast`, nothing imported.

- The toy lab is offered as a data source, a model id and a benchmark, never needed by the real path: no
  module outside `tropd_cli/toylab/` imports it at module level, except those in `TOYLAB_IMPORTERS`, each
  with its reason. Imports inside functions (the toy benchmark's grader and problems, `tropd toylab build`)
  are how the real path offers the toy lab without needing it.
- No import cycles among the package's modules (module-level imports; `if TYPE_CHECKING:` blocks are
  annotations only, which is how an objective names the configuration type that validates objective names).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tropd_cli"
TOYLAB = "tropd_cli.toylab"
TOYLAB_IMPORTERS = {
    "tropd_cli.data.sources": "the toy lab as distill's built-in prompt source (data.prompts: toylab)",
    "tropd_cli.data.prepare": "the toy lab as a data source of `tropd prepare --data toylab`",
    "tropd_cli.preflight.memory": "the toy prompt probe: the longest of a sample of toy prompts, for the estimate",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements outside functions and classes: top level, and inside top-level if/try blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                found += _module_level(node.body)
            found += _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(handler.body for handler in node.handlers), node.orelse, node.finalbody):
                found += _module_level(block)
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports at module level (`from a import b` names a.b when b is a
    module, else a)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _module_level(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            anchor = name.split(".") if is_package else name.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {target for target in targets if target in known}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(name, path, set(found)) for name, path in found.items()}


def test_only_the_allowed_modules_import_the_toy_lab():
    graph = import_graph()
    importers = {name for name, targets in graph.items()
                 if not (name == TOYLAB or name.startswith(TOYLAB + "."))
                 and any(target == TOYLAB or target.startswith(TOYLAB + ".") for target in targets)}
    assert importers - TOYLAB_IMPORTERS.keys() == set(), "the real path imports the toy lab at module level"
    assert TOYLAB_IMPORTERS.keys() - importers == set(), "allowed importers that no longer import it: drop them"


def test_no_import_cycles():
    graph = import_graph()
    cycles: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_graph_sees_known_imports():
    """The parser reads the imports it must: plain ones, a package's submodules, and none inside functions."""
    graph = import_graph()
    assert "tropd_cli.config" in graph["tropd_cli.toylab.tasks"]
    assert {"tropd_cli.preflight.memory", "tropd_cli.preflight.pairs"} <= graph["tropd_cli.preflight"]
    assert "tropd_cli.evaluation.registry" in graph["tropd_cli.evaluation.graders"]
    assert "tropd_cli.toylab.build" not in graph["tropd_cli.cli"]


OBJECTIVES = "tropd_cli.engine.objectives"


def objective_name_comparisons(path: Path, names: set[str]) -> list[str]:
    """`objective.name == "opd"`, `name in ("gkd", "seqkd")` and the like: comparisons of a name with an
    objective's name (a literal "tropd" compared with anything else is the tool's name)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        others = [ast.unparse(operand) for operand in [node.left, *node.comparators]
                  if not isinstance(operand, (ast.Constant, ast.Tuple, ast.List, ast.Set))]
        if not any("name" in other or "objective" in other for other in others):
            continue
        literals = [element for operand in [node.left, *node.comparators]
                    for element in (operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand])
                    if isinstance(element, ast.Constant) and element.value in names]
        found += [f"{path.name}:{node.lineno} compares with {literal.value!r}" for literal in literals]
    return found


def test_only_the_objective_registry_compares_objective_names():
    """The trainer, preflight, data sources and export read an objective's traits (`ObjectiveSpec`)."""
    names = {path.stem for path in (PACKAGE / "engine" / "objectives").glob("*.py")} - {"__init__", "base"}
    assert {"tropd", "opd", "gkd", "sft"} <= names
    found = [hit for name, path in modules().items() if not name.startswith(OBJECTIVES)
             for hit in objective_name_comparisons(path, names)]
    assert found == []


def test_a_comparison_with_an_objective_name_is_seen(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text('if config.objective.name in ("gkd", "seqkd") or name == "opd" or tool == "tropd":\n    pass\n')
    assert objective_name_comparisons(path, {"gkd", "seqkd", "opd"}) == [
        "probe.py:1 compares with 'gkd'", "probe.py:1 compares with 'seqkd'", "probe.py:1 compares with 'opd'"]
