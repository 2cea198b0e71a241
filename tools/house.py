"""The house in numbers, read from the source with `ast` (nothing imported): module sizes, the longest
functions, imports that cross rooms, import circles, and functions that take the whole RunConfig.

    python tools/house.py [PACKAGE_DIR]     # default: tropd_cli next to this folder

A room is a package two levels deep (`tropd_cli.engine.teacher`, `tropd_cli.export`); a module directly in
`tropd_cli/` is its own room. Imports count wherever they are written (module level and inside functions),
except under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import statistics
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(name: str, path: Path, tree: ast.AST, known: set[str]) -> set[str]:
    """The package's modules `name` imports anywhere but under `if TYPE_CHECKING:`."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip |= {id(child) for statement in node.body for child in ast.walk(statement)}
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {target for target in targets if target in known and target != name}


def room(module: str) -> str:
    depth = 3 if module.startswith("tropd_cli.engine.") else 2
    return ".".join(module.split(".")[:depth])


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            visit(node)
    return found


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tropd_cli"
    paths = {module_name(root, path): path for path in sorted(root.rglob("*.py"))}
    trees = {name: ast.parse(path.read_text()) for name, path in paths.items()}
    lines = {name: len(path.read_text().splitlines()) for name, path in paths.items()}
    graph = {name: imports(name, paths[name], trees[name], set(paths)) for name in paths}
    functions = []
    whole_config = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if any(argument.annotation is not None and "RunConfig" in ast.unparse(argument.annotation)
                       for argument in arguments):
                    whole_config.append(f"{name}:{node.name}")
    crossing = sorted((room(source), room(target)) for source, targets in graph.items() for target in targets
                      if room(source) != room(target))
    sideways = sorted({(s, t) for s, t in crossing if s.startswith("tropd_cli.engine.") and t.startswith(
        "tropd_cli.engine.") and s.count(".") == 2 and t.count(".") == 2})
    print(f"modules {len(paths)}, lines {sum(lines.values())}, per module median "
          f"{statistics.median(lines.values()):.0f}, largest {max(lines.values())} "
          f"({max(lines, key=lines.get)})")
    print("longest functions: " + ", ".join(f"{where} {length}" for length, where in sorted(functions)[::-1][:8]))
    print(f"imports crossing rooms: {len(crossing)} (module pairs); between engine's rooms: "
          + ", ".join(f"{s.split('.')[-1]}->{t.split('.')[-1]}" for s, t in sideways))
    found = circles(graph)
    print(f"import circles: {len(found)}" + "".join(f"\n  {' '.join(c)}" for c in found))
    print(f"functions taking the whole RunConfig: {len(whole_config)} in "
          f"{len({where.split(':')[0] for where in whole_config})} modules")


if __name__ == "__main__":
    main()
