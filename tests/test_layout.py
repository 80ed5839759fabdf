"""The package layering that markovian_jax/__init__.py states: each package imports only the
packages listed before it, entry modules import the library and never each other, and no module
of the library imports an entry module. Read from the source (ast), so a lazy import inside a
function counts as much as one at the top."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "markovian_jax"
# Bottom to top; a package may import itself and those before it.
LAYERS = ("runtime", "configs", "models", "sampling", "data", "objectives", "reporting", "training",
          "planning", "analysis", "trainer")
# Packages on one floor that must not import each other.
SIBLINGS = {"models": {"data", "objectives"}, "data": {"models", "sampling", "objectives"},
            "objectives": {"models", "sampling", "data"}}
ENTRIES = ("train", "evaluate", "sample", "plan", "report", "export", "analyze")


def _room(module: str) -> str:
  """'markovian_jax.training.pipeline' -> 'training'; 'markovian_jax' -> ''."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _imports(path: pathlib.Path) -> set:
  """Every markovian_jax module the file imports, `from markovian_jax import x` as
  'markovian_jax.x'."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("markovian_jax"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("markovian_jax"):
      if node.module == "markovian_jax":
        found.update(f"markovian_jax.{a.name}" for a in node.names)
      else:
        found.add(node.module)
  return found


def _modules():
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(PKG.parent).with_suffix("")
    yield ".".join(rel.parts).removesuffix(".__init__"), path


def test_every_module_lives_in_a_named_room():
  rooms = {_room(m) for m, _ in _modules()} - {""}
  assert rooms <= set(LAYERS) | set(ENTRIES), rooms - set(LAYERS) - set(ENTRIES)
  top = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
  assert top == sorted(ENTRIES + ("trainer",)), top


@pytest.mark.parametrize("module,path", list(_modules()), ids=lambda v: str(v)[-40:])
def test_imports_go_down_only(module, path):
  here = _room(module)
  for imported in _imports(path):
    there = _room(imported)
    if here in ENTRIES:
      assert there not in ENTRIES, f"{module} imports the entry module {imported}"
      continue
    if not here or there == here:
      continue
    assert there not in ENTRIES, f"library module {module} imports the entry module {imported}"
    assert there in LAYERS, f"{module} imports {imported}, outside the layers"
    assert LAYERS.index(there) < LAYERS.index(here), f"{module} imports upwards: {imported}"
    assert there not in SIBLINGS.get(here, ()), f"{module} imports its sibling {imported}"


def test_the_layer_checker_catches_an_upward_import(tmp_path):
  """The checker itself: a runtime module that imports training is found."""
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n  from markovian_jax.training import specs\n")
  with pytest.raises(AssertionError, match="imports upwards"):
    test_imports_go_down_only("markovian_jax.runtime.bad", bad)
