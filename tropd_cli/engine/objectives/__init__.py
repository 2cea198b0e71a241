"""The objective registry: one module per objective in this package, each with its loss and a `SPEC`.

An objective's module name is its `objective.name`; `base.py` holds what they share. Listing the names
imports nothing (so the configuration validates `objective.name` without loading torch), nor does `GUIDED`,
the one trait the configuration's rules read; `get_objective` imports the one module asked for. Adding an
objective is one new module here, its tests and its README row (and its name in `GUIDED` if it takes guidance).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tropd_cli.engine.objectives.base import ObjectiveSpec

SHARED_MODULES = frozenset({"base"})
# The objectives whose SPEC accepts objective.guidance, by name (tests/test_config.py holds it to the specs).
GUIDED = frozenset({"tropd"})


@cache
def objective_names() -> tuple[str, ...]:
    """Every objective's name, in the order the README lists them (tropd first, then alphabetical)."""
    names = sorted(module.name for module in pkgutil.iter_modules(__path__)
                   if module.name not in SHARED_MODULES and not module.name.startswith("_"))
    return tuple(sorted(names, key=lambda name: name != "tropd"))


@cache
def get_objective(name: str) -> ObjectiveSpec:
    """The spec of objective `name` (a name from `objective_names()`)."""
    if name not in objective_names():
        raise KeyError(f"unknown objective {name!r}; known: {', '.join(objective_names())}")
    spec = importlib.import_module(f"{__name__}.{name}").SPEC
    assert spec.name == name, f"{name}.py declares SPEC.name={spec.name!r}"
    return spec
