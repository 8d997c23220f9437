"""The house rules of STYLE.md §9–10, checked on the source: floors with arrows only downwards, no import
cycles, no file over about a fifth of the package, and the library never imports experiments/."""

import collections
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "llama_jax"

# What each room may import from llama_jax (its own room always). Lowest floor first.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "parallel": {"errors", "config"},
    "kernels": {"errors", "config", "parallel"},
    "model": {"errors", "config", "parallel", "kernels"},
    "data": {"errors", "config", "parallel"},
    "interop": {"errors", "config", "parallel", "model", "data"},  # a weights file may carry its tokenizer
    "inference": {"errors", "config", "parallel", "model"},
    "evals": {"errors", "config", "parallel", "kernels", "model", "data", "inference"},
    "training": {"errors", "config", "parallel", "kernels", "model", "data", "interop", "inference",
                 "evals"},
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PKG.rglob("*.py"):
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(path: pathlib.Path) -> set[str]:
  """Every llama_jax module (or experiments) that `path` imports, at any depth of the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      found |= {f"{node.module}.{a.name}" for a in node.names}
  return {m for m in found if m.split(".")[0] in ("llama_jax", "experiments")}


def _room(module: str) -> str:
  return module.split(".")[1] if module.count(".") else "__init__"


MODULES = _modules()


def test_every_room_is_in_the_table():
  rooms = {_room(m) for m in MODULES} - {"__init__"}
  assert rooms <= set(ALLOWED), f"new folder(s) {rooms - set(ALLOWED)}: give them a floor in ALLOWED"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_point_downwards(module):
  room = _room(module)
  bad = []
  for target in _imports(MODULES[module]):
    if target.startswith("experiments"):
      bad.append(f"{target} (the library never imports the entry points)")
      continue
    if target == "llama_jax" or target not in MODULES and target.rsplit(".", 1)[0] not in MODULES:
      continue
    other = _room(target if target in MODULES else target.rsplit(".", 1)[0])
    if other not in (room, "__init__") and other not in ALLOWED.get(room, set()):
      bad.append(f"{target} ({room} -> {other} points upwards or sideways)")
  assert not bad, f"{module} imports " + "; ".join(bad)


def test_no_import_cycles():
  graph = {}
  for m, path in MODULES.items():
    graph[m] = {t if t in MODULES else t.rsplit(".", 1)[0] for t in _imports(path)} & set(MODULES) - {m}
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    for n in graph[m]:
      if state.get(n) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
      if n not in state:
        visit(n, stack + [n])
    state[m] = 2

  for m in graph:
    if m not in state:
      visit(m, [m])


def test_no_file_holds_more_than_a_fifth_of_the_package():
  lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
  total = sum(lines.values())
  biggest = max(lines, key=lines.get)
  assert lines[biggest] <= 0.2 * total, f"{biggest}: {lines[biggest]} of {total} lines"


def test_test_file_names_are_unique():
  # tests/ has no __init__.py files: pytest imports each test file by its base name, so two files of one
  # name in different folders stop the whole run at collection ("import file mismatch").
  names = collections.Counter(p.name for p in (PKG.parent / "tests").rglob("test_*.py"))
  assert not [n for n, k in names.items() if k > 1], names
