"""The package is layered: no import circle between modules, and none between packages.

Every `import paperjax...` counts, at the top of a module or inside a function (a lazy
import is still an arrow). Two graphs must be acyclic:
- modules: no module reaches itself through its imports;
- units: a package without sub-packages (models/transformer, align, ...) is one unit, and
  each module of a package that has sub-packages (models/protocol.py, ops/rope.py) is a
  unit of its own. So no module imports from a package that imports it.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
  """Every module of the distribution: dotted name -> file."""
  package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
  modules = {}
  for top, folder in package_dir.items():
    for path in sorted((ROOT / folder).rglob("*.py")):
      parts = path.relative_to(ROOT / folder).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      modules[".".join((top, *parts))] = path
  return modules


def _imports(source: str, package: str, modules: Mapping[str, Path]) -> set[str]:
  """The modules of `modules` that `source`, a module of `package`, imports anywhere in its
  body (a `from package import module` names the module)."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
      found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
  return {m for m in found if m in modules}


def _package(name: str, modules: Mapping[str, Path]) -> str:
  return name if modules[name].name == "__init__.py" else name.rpartition(".")[0]


def _unit(name: str, modules: Mapping[str, Path]) -> str:
  """A leaf package for its modules; a module of a package with sub-packages stands alone."""
  package = _package(name, modules)
  has_subpackages = any(m.startswith(package + ".") and modules[m].name == "__init__.py" for m in modules)
  return name if has_subpackages else package


def _cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as a path that returns to its start, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return [*path[path.index(nxt) :], nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = 2
    path.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def _graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
  modules = _modules()
  by_module = {
    name: _imports(path.read_text(), _package(name, modules), modules) - {name} for name, path in modules.items()
  }
  by_unit: dict[str, set[str]] = {}
  for name, imported in by_module.items():
    unit = _unit(name, modules)
    by_unit.setdefault(unit, set()).update(u for m in imported if (u := _unit(m, modules)) != unit)
  return by_module, by_unit


def test_no_module_imports_itself_through_others():
  cycle = _cycle(_graphs()[0])
  assert cycle is None, "import circle: " + " -> ".join(cycle or ())


def test_no_package_imports_a_package_that_imports_it():
  cycle = _cycle(_graphs()[1])
  assert cycle is None, "packages import each other: " + " -> ".join(cycle or ())


def test_the_graphs_see_the_imports_they_judge():
  """The checker finds known arrows (absolute, from-package, relative and lazy imports) and a planted circle."""
  by_module, by_unit = _graphs()
  assert "paperjax.models.transformer.llama" in by_module["paperjax.models.protocol"]
  assert "paperjax.ops.rope" in by_module["paperjax.models.transformer.llama"]  # from paperjax.ops import rope
  source = "import os\ndef f():\n  from paperjax.ops import rope\n  from ..models import stack\n  from . import norms\n"
  modules = _modules()
  assert _imports(source, "paperjax.ops", modules) == {
    "paperjax.ops.rope",
    "paperjax.models.stack",
    "paperjax.ops.norms",
  }
  assert _imports(source, "paperjax.align", modules) == {"paperjax.ops.rope", "paperjax.models.stack", "paperjax.align"}
  assert "paperjax.models.transformer" in by_unit["paperjax.models.parallel"]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("unit", ["paperjax.models.protocol", "paperjax.models.transformer"])
def test_units_are_modules_or_leaf_packages(unit):
  modules = _modules()
  assert {_unit(m, modules) for m in modules if m.startswith(unit)} == {unit}
