"""The package's layout rules (DESIGN.md section 3), read from the source with `ast`, nothing imported.

- The toy lab is behind one seam: it registers a prompt generator (prompt source, benchmark and grader,
  export's verification prompts, preflight's prompt probe) by name and module path in
  `tropd_cli/data/__init__.py` (`TOYLAB_REGISTRATION`), and the `toylab:NAME` model ids in models.py. No
  other module imports it, at module level or inside a function, except those in `TOYLAB_IMPORTERS`, each
  with its reason; none compares a value with "toylab" or names its modules, except those in
  `TOYLAB_NAMERS`, each with its reason.
- No import cycles among the package's modules, imports inside functions included (`if TYPE_CHECKING:`
  blocks are annotations only, which is how an objective names the configuration type that validates
  objective names).
- Importing the configuration imports no torch (checked in a fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tropd_cli"
TOYLAB = "tropd_cli.toylab"
TOYLAB_REGISTRATION = "tropd_cli.data"
TOYLAB_IMPORTERS = {
    "tropd_cli.cli": "`tropd toylab build`, the toy lab's own command, imports its builder when it runs",
}
TOYLAB_NAMERS: dict[str, str] = {}  # modules outside the toy lab allowed to name it, each with its reason


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
            if not _type_checking(node):
                found += _module_level(node.body)
            found += _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(handler.body for handler in node.handlers), node.orelse, node.finalbody):
                found += _module_level(block)
    return found


def _everywhere(nodes: list[ast.AST]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements anywhere, inside functions and classes too, except `if TYPE_CHECKING:` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _type_checking(node):
            found += _everywhere(node.orelse)
        else:
            found += _everywhere(list(ast.iter_child_nodes(node)))
    return found


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_modules(name: str, path: Path, known: set[str], in_functions: bool = False) -> set[str]:
    """The package's modules that `name` imports at module level, or anywhere with `in_functions`
    (`from a import b` names a.b when b is a module, else a)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    targets: set[str] = set()
    for node in _everywhere(tree.body) if in_functions else _module_level(tree.body):
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


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a module importing its own package is left out)."""
    found = modules()
    return {name: imported_modules(name, path, set(found), in_functions) - {name} for name, path in found.items()}


def in_toylab(name: str) -> bool:
    return name == TOYLAB or name.startswith(TOYLAB + ".")


def test_only_the_allowed_modules_import_the_toy_lab():
    graph = import_graph(in_functions=True)
    importers = {name for name, targets in graph.items() if not in_toylab(name) and any(map(in_toylab, targets))}
    assert importers - TOYLAB_IMPORTERS.keys() == set(), "the real path imports the toy lab"
    assert TOYLAB_IMPORTERS.keys() - importers == set(), "allowed importers that no longer import it: drop them"


def toylab_names(path: Path) -> list[str]:
    """Where a module names the toy lab in code: a comparison with "toylab" (`==`, `!=`, `in`, or a
    "toylab..." prefix given to startswith), or a string naming one of its modules ("tropd_cli.toylab...")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            constants = [element for operand in operands
                         for element in (operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set))
                                         else [operand])]
            if any(isinstance(c, ast.Constant) and c.value == "toylab" for c in constants):
                found.append(f"{path.name}:{node.lineno} compares with 'toylab'")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith")):
            if any(isinstance(arg, ast.Constant) and str(arg.value).startswith("toylab") for arg in node.args):
                found.append(f"{path.name}:{node.lineno} compares with 'toylab'")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(TOYLAB):
            found.append(f"{path.name}:{node.lineno} names {node.value}")
    return found


def test_no_module_outside_the_toy_lab_names_it():
    """The real path reaches the toy lab through the prompt-generator registry, never by its name."""
    namers = {name: hits for name, path in modules().items()
              if not in_toylab(name) and name != TOYLAB_REGISTRATION and (hits := toylab_names(path))}
    assert namers.keys() - TOYLAB_NAMERS.keys() == set(), [hit for hits in namers.values() for hit in hits]
    assert TOYLAB_NAMERS.keys() - namers.keys() == set(), "allowed modules that no longer name it: drop them"
    assert [hit.split(" ", 1)[1] for hit in toylab_names(modules()[TOYLAB_REGISTRATION])] == [
        "names tropd_cli.toylab.generator"]


def test_a_comparison_with_the_toy_lab_is_seen(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text('if prompts == "toylab" or b in ("toylab", "x") or s.startswith("toylab:"):\n'
                    '    m = "tropd_cli.toylab.tasks"\nx = {"toylab": 1}\n')
    assert toylab_names(path) == ["probe.py:1 compares with 'toylab'", "probe.py:1 compares with 'toylab'",
                                  "probe.py:1 compares with 'toylab'", "probe.py:2 names tropd_cli.toylab.tasks"]


def test_importing_the_configuration_imports_no_torch():
    """A config error is as fast as `presets show`: validation looks names up (objectives, benchmarks, prompt
    generators) without importing an objective, the benchmark registry or the toy lab."""
    code = ("import sys; from tropd_cli.config import load_config; load_config('qwen3-8b-1.7b-lora'); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('tropd_cli.toylab', "
            "'tropd_cli.evaluation.', 'tropd_cli.engine.objectives.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_import_cycles():
    graph = import_graph(in_functions=True)
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
    """The parser reads the imports it must: plain ones, a package's submodules, inside functions only when
    asked, and never `if TYPE_CHECKING:` blocks."""
    graph = import_graph()
    assert "tropd_cli.config" in graph["tropd_cli.toylab.tasks"]
    assert {"tropd_cli.preflight.memory", "tropd_cli.preflight.pairs"} <= graph["tropd_cli.preflight"]
    assert "tropd_cli.evaluation.registry" in graph["tropd_cli.evaluation.graders"]
    assert "tropd_cli.toylab.build" not in graph["tropd_cli.cli"]
    assert "tropd_cli.toylab.build" in import_graph(in_functions=True)["tropd_cli.cli"]
    assert "tropd_cli.config" not in import_graph(in_functions=True)["tropd_cli.engine.objectives.base"]


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


def test_the_house_in_numbers_runs_and_finds_no_circle():
    """`tools/house.py`, which CONTRIBUTING.md points to, reads the package and counts what the rules above forbid."""
    script = PACKAGE.parent / "tools" / "house.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"modules {len(modules())}," in out
    assert "import circles: 0\n" in out


def test_every_vllm_engine_starts_in_one_module_and_no_seam_reaches_into_another_backend():
    """The rollout's and the teacher's vLLM code share `engine/vllm_engine.py`; inside the engine no module
    imports a backend of another room (the seams' own types, `rollout.base` and `teacher.base`, are for
    everyone; a package's own modules, such as the teacher's sampler factory, the run's wiring, the command line
    and preflight may reach a backend)."""
    graph = import_graph(in_functions=True)
    backends = {"tropd_cli.engine.rollout": ("hf", "vllm"), "tropd_cli.engine.teacher": ("hf", "vllm", "server")}
    for package, names in backends.items():
        for name in names:
            importers = {source for source, targets in graph.items()
                         if f"{package}.{name}" in targets and source.startswith("tropd_cli.engine")}
            inside = {source for source in importers if source.startswith(f"{package}.")}  # the package's own
            assert importers - inside <= {package, "tropd_cli.engine.run"}, (package, name, importers)
    assert {"tropd_cli.engine.rollout.vllm", "tropd_cli.engine.teacher.vllm"} <= {
        source for source, targets in graph.items() if "tropd_cli.engine.vllm_engine" in targets}
