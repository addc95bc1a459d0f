"""The import structure: no cycles among jdiff's modules, and each layer imports only what it may.

Read from the source with `ast`, so every import counts, also those inside functions, whatever a test run loads.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "jdiff"


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str) -> list[tuple[str, bool]]:
  """(imported module, at module level) for each import in a jdiff module; `from a import b` counts a.b if it is
  a module, else a."""
  found = []
  tree = ast.parse(MODULES[name].read_text())
  top_level = {id(node) for node in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, id(node) in top_level) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        child = f"{node.module}.{alias.name}"
        found.append((child if child in MODULES else node.module, id(node) in top_level))
  return found


def reaches(module: str, forbidden: tuple[str, ...]) -> list[str]:
  return sorted({m for m, _ in imports_of(module) if any(m == f or m.startswith(f + ".") for f in forbidden)})


def test_module_level_imports_have_no_cycles():
  graph = {name: {m for m, top in imports_of(name) if top and m in MODULES and m != name} for name in MODULES}
  # A package imports its submodules' names through its __init__; that is not a cycle back into the package.
  graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
  state: dict[str, int] = {}

  def visit(name: str, path: list[str]):
    state[name] = 1
    for dep in sorted(graph[name]):
      if state.get(dep) == 1:
        pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [name, dep]))
      if dep not in state:
        visit(dep, path + [name])
    state[name] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [])


MATHS = ("jdiff.schedules", "jdiff.diffusion", "jdiff.samplers", "jdiff.schedulers")
TRAINING = ("jdiff.train", "jdiff.data", "jdiff.cli", "tensorflow", "tensorflow_datasets", "clu")


@pytest.mark.parametrize("module", MATHS)
def test_the_maths_imports_no_flax_and_no_other_layer(module):
  assert reaches(module, ("flax", "optax", "orbax", "jdiff.models", "jdiff.pipeline") + TRAINING) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("jdiff.models")))
def test_models_import_no_training_data_or_inference_code(module):
  assert reaches(module, ("jdiff.pipeline", "jdiff.generate", "jdiff.checkpoint") + TRAINING) == []


INFERENCE = sorted(m for m in MODULES if not m.startswith(("jdiff.train", "jdiff.data", "jdiff.cli", "jdiff.metrics")))


@pytest.mark.parametrize("module", INFERENCE)
def test_the_library_outside_training_imports_no_training_code_tensorflow_or_clu(module):
  assert reaches(module, TRAINING) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("jdiff.cli")))
def test_only_the_command_lines_import_the_command_lines(module):
  assert reaches(module, ("jdiff.cli",)) == []
