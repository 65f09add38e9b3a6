"""The package layout follows the data flow: no import loops, no module importing one from a
later stage, no module over 450 lines. Read from the source (ast), nothing is imported."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hyena_jax"

# The stages of the data flow, in order; a module may import from its own stage or earlier ones.
STAGES = {
    "hyena_jax.errors": 0, "hyena_jax.storage": 0, "hyena_jax.cpu_runtime": 0,
    "hyena_jax.data": 1,
    "hyena_jax.model": 2,
    "hyena_jax.training": 3,
    "hyena_jax.interop": 4,
    "hyena_jax.inference": 5, "hyena_jax.downstream": 5,
    "hyena_jax.cli": 6,
}
TOOLS = 7  # hyena_jax/<tool>.py: the command-line entry points
MAX_LINES = 450


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> int:
  for prefix in sorted(STAGES, key=len, reverse=True):
    if module == prefix or module.startswith(prefix + "."):
      return STAGES[prefix]
  return TOOLS


def _imports() -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hyena_jax"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          found.add(full if full in modules else node.module)
      elif isinstance(node, ast.Import):
        found |= {a.name for a in node.names if a.name.startswith("hyena_jax.")}
    graph[name] = {m for m in found if m in modules and m != name}
  return graph


def _upward(graph: dict[str, set[str]]) -> list[str]:
  return [f"{src} -> {dst}" for src, dsts in graph.items() if src != "hyena_jax"
          for dst in dsts if _stage(dst) > _stage(src)]


def _loop(graph: dict[str, set[str]]) -> list[str]:
  """One import cycle, or []."""
  state: dict[str, str] = {}

  def visit(node, path):
    state[node] = "open"
    for dst in sorted(graph.get(node, ())):
      if state.get(dst) == "open":
        return path + [dst]
      if dst not in state:
        found = visit(dst, path + [dst])
        if found:
          return found
    state[node] = "done"
    return []

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [node])
      if found:
        return found
  return []


def test_no_module_imports_a_later_stage_and_there_are_no_loops():
  graph = _imports()
  assert len(graph) > 40  # the whole package was read
  assert not _upward(graph), _upward(graph)
  assert not _loop(graph), " -> ".join(_loop(graph))


def test_every_module_fits_on_a_few_screens():
  long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long


def test_the_checks_catch_what_they_look_for():
  bad = {"hyena_jax.model.hyenadna": {"hyena_jax.training.checkpoint"},
         "hyena_jax.training.checkpoint": {"hyena_jax.model.hyenadna"},
         "hyena_jax.main": {"hyena_jax.cli"}, "hyena_jax.cli": set()}
  assert _upward(bad) == ["hyena_jax.model.hyenadna -> hyena_jax.training.checkpoint"]
  assert _loop(bad) == ["hyena_jax.model.hyenadna", "hyena_jax.training.checkpoint",
                        "hyena_jax.model.hyenadna"]
