"""The package layering that markovian_jax/__init__.py states: each package imports only the
packages listed before it; the commands (markovian_jax/cli/) import the library and never each
other; each entry alias (markovian_jax/train.py, ...) imports only its command; no module of the
library imports a command or an alias. Read from the source (ast), so a lazy import inside a
function counts as much as one at the top; relative imports are resolved against the importing
module, and a string handed to an importer (importlib.import_module, __import__, ...) that names
a markovian_jax module counts as an import of it. The package's own __init__ runs before any of
its modules, so it imports nothing of the package."""

import ast
import pathlib
import re
import shutil

import pytest

PKG = pathlib.Path(__file__).resolve().parents[2] / "markovian_jax"
# Bottom to top; a package may import itself and those before it.
LAYERS = (
  "runtime",
  "configs",
  "models",
  "sampling",
  "data",
  "objectives",
  "reporting",
  "training",
  "planning",
  "analysis",
  "trainer",
  "cli",
)
# Packages on one floor that must not import each other.
SIBLINGS = {
  "models": {"data", "objectives"},
  "data": {"models", "sampling", "objectives"},
  "objectives": {"models", "sampling", "data"},
}
ENTRIES = ("train", "evaluate", "sample", "plan", "report", "export", "analyze")
# A whole string constant naming a module of the package ("markovian_jax.trainer", or
# "markovian_jax.trainer:Trainer" as pkgutil.resolve_name takes it).
_NAMED = re.compile(r"markovian_jax(\.\w+)*(:[\w.]+)?")


def _room(module: str) -> str:
  """'markovian_jax.training.pipeline' -> 'training'; 'markovian_jax' -> ''."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _resolve(name: str, level: int, package: str) -> str:
  """The absolute module of a relative import `level` dots up from `package`."""
  if not level:
    return name
  base = package.split(".")
  if level > len(base):
    raise AssertionError(f"relative import beyond the top package from {package}")
  return ".".join(base[: len(base) - level + 1] + ([name] if name else []))


def _imports(module: str, path: pathlib.Path) -> set:
  """Every markovian_jax module that `module` (source `path`) imports, `from markovian_jax import
  x` as 'markovian_jax.x'."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      source = _resolve(node.module or "", node.level, package)
      # `from pkg import x` may import the module pkg.x; count both, the room is pkg's either way
      # unless pkg is the top package.
      found.add(source)
      found.update(f"{source}.{a.name}" for a in node.names if a.name != "*")
    elif isinstance(node, ast.Call):
      strings = [
        a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
      ]
      # import_module(".trainer", "markovian_jax"): a relative name against its package.
      if len(strings) == 2 and strings[0].startswith(".") and _NAMED.fullmatch(strings[1]):
        level = len(strings[0]) - len(strings[0].lstrip("."))
        found.add(_resolve(strings[0].lstrip("."), level, strings[1]))
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      if _NAMED.fullmatch(node.value):
        found.add(node.value.partition(":")[0])
  return {m for m in found if m == "markovian_jax" or m.startswith("markovian_jax.")}


def _modules(pkg: pathlib.Path = PKG):
  for path in sorted(pkg.rglob("*.py")):
    rel = path.relative_to(pkg.parent).with_suffix("")
    yield ".".join(rel.parts).removesuffix(".__init__"), path


def test_every_module_lives_in_a_named_room():
  rooms = {_room(m) for m, _ in _modules()} - {""}
  assert rooms <= set(LAYERS) | set(ENTRIES), rooms - set(LAYERS) - set(ENTRIES)
  top = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
  assert top == sorted(ENTRIES + ("trainer",)), top
  # Every package directory is a package: its __init__ (and so its imports) is checked too.
  assert all((p.parent / "__init__.py").is_file() for p in PKG.rglob("*.py")), [
    str(p.parent) for p in PKG.rglob("*.py") if not (p.parent / "__init__.py").is_file()
  ]


@pytest.mark.parametrize("module,path", list(_modules()), ids=lambda v: str(v)[-40:])
def test_imports_go_down_only(module, path):
  here = _room(module)
  for imported in sorted(_imports(module, path)):
    there = _room(imported)
    if not here:
      # The top package's __init__ runs first whatever is imported: it imports nothing of it.
      assert not there, f"the package __init__ imports {imported}"
      continue
    if here in ENTRIES:
      assert imported in ("markovian_jax", "markovian_jax.cli", f"markovian_jax.cli.{here}"), (
        f"the alias {module} imports {imported}, not only markovian_jax.cli.{here}"
      )
      continue
    if here == "cli":
      assert there not in ENTRIES, f"{module} imports the entry module {imported}"
      command, other = module.split(".")[2:3], imported.split(".")[2:3]
      assert there != "cli" or not other or not command or other == command, (
        f"{module} imports the command {imported}"
      )
      continue
    if not there or there == here:
      continue
    assert there not in ENTRIES, f"library module {module} imports the entry module {imported}"
    assert there in LAYERS, f"{module} imports {imported}, outside the layers"
    assert LAYERS.index(there) < LAYERS.index(here), f"{module} imports upwards: {imported}"
    assert there not in SIBLINGS.get(here, ()), f"{module} imports its sibling {imported}"


# The checker itself: each violation planted in a copy of the real package is found.
@pytest.mark.parametrize(
  "module,line,message",
  [
    (
      "runtime.cli",
      "def f():\n  from markovian_jax.training import specs\n",
      "imports upwards: markovian_jax.training",
    ),
    ("runtime.cli", "from ..training import specs\n", "imports upwards: markovian_jax.training"),
    (
      "runtime.errors",
      "import importlib\nT = importlib.import_module('markovian_jax.trainer')\n",
      "imports upwards: markovian_jax.trainer",
    ),
    (
      "runtime.errors",
      "import importlib\nT = importlib.import_module('.train', 'markovian_jax')\n",
      "imports the entry module markovian_jax.train",
    ),
    ("models.decoder", "from .. import data\n", "imports upwards: markovian_jax.data"),
    (
      "data.prompts",
      "from ..models.decoder import forward\n",
      "imports its sibling markovian_jax.models",
    ),
    (
      "sampling.__init__",
      "from . import sampler\nfrom .. import training\n",
      "imports upwards: markovian_jax.training",
    ),
    (
      "__init__",
      "from markovian_jax import trainer\n",
      "the package __init__ imports markovian_jax.trainer",
    ),
    ("__init__", "from .runtime import errors\n", "the package __init__ imports markovian_jax."),
    (
      "train",
      "from . import evaluate\n",
      "the alias markovian_jax.train imports markovian_jax.evaluate",
    ),
    ("cli.train", "from . import evaluate\n", "imports the command markovian_jax.cli.evaluate"),
    (
      "cli.report",
      "from markovian_jax import analyze\n",
      "imports the entry module markovian_jax.analyze",
    ),
    (
      "training.pipeline",
      "from markovian_jax.cli import train\n",
      "imports upwards: markovian_jax.cli",
    ),
  ],
)
def test_the_layer_checker_catches_a_planted_import(tmp_path, module, line, message):
  pkg = pathlib.Path(
    shutil.copytree(PKG, tmp_path / "markovian_jax", ignore=shutil.ignore_patterns("__pycache__"))
  )
  planted = pkg.joinpath(*module.split(".")).with_suffix(".py")
  planted.write_text(planted.read_text() + "\n" + line)
  name = f"markovian_jax.{module}".removesuffix(".__init__")
  assert (name, planted) in set(_modules(pkg))
  with pytest.raises(AssertionError, match=re.escape(message)):
    test_imports_go_down_only(name, planted)
