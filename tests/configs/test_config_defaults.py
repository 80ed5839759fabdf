"""Each config default is written once (configs/schema.py) and every view of it agrees.

The views: the ConfigDict `base.get_config(task)` builds (what `--config.x.y=` overrides and a run
records), the typed specs that read and validate it (training/specs.py), the loss settings'
own dataclass (objectives.ObjectiveConfig, whose defaults the library's callers get), and the
configuration reference. A key added to one view and not the others fails here.
"""

import ast
import dataclasses
import importlib
import pathlib

import pytest

from markovian_jax import objectives
from markovian_jax.configs import base, schema
from markovian_jax.data import tasks as tasks_lib
from markovian_jax.training import config_reference, specs

# ObjectiveConfig fields that are not objective.* keys: the group size is train.group_size, and
# the advantage's epsilon is not a knob of the run config.
NOT_OBJECTIVE_KEYS = {"group_size", "advantage_eps"}


def _leaves(c, prefix=""):
  out = {}
  for key, value in c.items():
    if hasattr(value, "items"):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _schema_keys():
  """Dotted key -> its schema field, every section."""
  keys = {f.name: f for f in dataclasses.fields(schema.Run)}
  for name, section in schema.SECTIONS.items():
    keys.update({f"{name}.{f.name}": f for f in dataclasses.fields(section)})
  return keys


def _defaults(fields):
  return {f.name: f.default for f in fields}


@pytest.mark.parametrize("task", tasks_lib.TASKS)
def test_the_built_config_holds_every_schema_key_at_its_default(task):
  built = _leaves(base.get_config(task))
  keys = _schema_keys()
  assert set(built) == set(keys), (
    "in the config only",
    set(built) - set(keys),
    "in the schema only",
    set(keys) - set(built),
  )
  for key, f in keys.items():
    want = schema.default(f, task)
    # Equal and of the same type: `--config.x=` parses an override as the default's type.
    assert (built[key], type(built[key])) == (want, type(want)), key


def test_task_defaults_differ_only_where_the_schema_says():
  """A key without `by_task` has one default for every task; a task override names a task."""
  built = {task: _leaves(base.get_config(task)) for task in tasks_lib.TASKS}
  for key, f in _schema_keys().items():
    by_task = f.metadata["by_task"]
    values = {task: built[task][key] for task in tasks_lib.TASKS}
    if by_task is None:
      assert set(values.values()) == {f.default}, key
    elif not callable(by_task):
      assert set(by_task) <= set(tasks_lib.TASKS), (key, set(by_task) - set(tasks_lib.TASKS))
      assert all(values[t] == by_task.get(t, f.default) for t in tasks_lib.TASKS), key


def test_every_section_spec_is_its_schema_section():
  assert list(specs.SECTION_SPECS) == list(schema.SECTIONS)
  for name, spec in specs.SECTION_SPECS.items():
    if name == "objective":
      continue
    assert issubclass(spec, schema.SECTIONS[name]) and spec.SECTION == name, name
    # No field of its own: a key and its default live in the schema only.
    assert dataclasses.fields(spec) == dataclasses.fields(schema.SECTIONS[name]), name


def test_the_objective_keys_are_the_loss_fields_and_the_specs_own():
  """objective.* = ObjectiveSpec's own fields + ObjectiveConfig's fields that are keys, and each
  default agrees with the schema's (ei_std: -1 in the config is None, off, in the loss)."""
  own = {f.name: f.default for f in dataclasses.fields(specs.ObjectiveSpec) if f.name != "loss"}
  loss = {
    f.name: f.default
    for f in dataclasses.fields(objectives.ObjectiveConfig)
    if f.name not in NOT_OBJECTIVE_KEYS
  }
  keys = _defaults(dataclasses.fields(schema.Objective))
  assert not set(own) & set(loss)
  assert set(own) | set(loss) == set(keys), (
    "missing from the schema",
    set(own) | set(loss) - set(keys),
    "schema only",
    set(keys) - set(own) - set(loss),
  )
  assert own == {k: keys[k] for k in own}
  assert keys["ei_std"] < 0 and loss.pop("ei_std") is None
  assert loss == {k: keys[k] for k in loss}


def test_a_key_missing_from_the_config_reads_as_its_default():
  """A run recorded before a key existed lacks it; the spec then holds the same default the
  config would have had, for every key (the task-dependent ones: gsm8k's)."""
  full = specs.RunSpec.read(base.get_config("gsm8k"))
  for name in schema.SECTIONS:
    for f in dataclasses.fields(schema.SECTIONS[name]):
      c = base.get_config("gsm8k")
      c[name] = {k: v for k, v in c[name].items() if k != f.name}
      got = specs.RunSpec.read(c)
      section_got, section_full = getattr(got, name), getattr(full, name)
      if name == "objective" and not hasattr(section_got, f.name):
        section_got, section_full = section_got.loss, section_full.loss
      value = getattr(section_got, f.name)
      if f.metadata["by_task"] is None:
        assert value == getattr(section_full, f.name), f"{name}.{f.name}"
      else:
        assert value == f.default, f"{name}.{f.name}"


def test_every_key_has_a_one_line_description_in_the_reference():
  listed = config_reference.keys("gsm8k").splitlines()
  keys = _schema_keys()
  assert len(listed) == len(keys)
  for line in listed:
    key, _, rest = line.partition(" = ")
    description = keys[key].metadata["description"]
    assert description.strip() and "\n" not in description, key
    assert rest.endswith(f"  # {description}"), line
  page = config_reference.render()
  assert all(f"| {config_reference._cell(keys[k].metadata['description'])} |" in page for k in keys)


def test_a_key_added_to_the_schema_appears_in_the_config_specs_and_reference(monkeypatch):
  @dataclasses.dataclass(frozen=True)
  class Lora(schema.Lora):
    planted: float = schema.knob(0.25, "a planted key", by_task={"svamp": 0.5})

  @dataclasses.dataclass(frozen=True)
  class LoraSpec(Lora, specs._Section):
    SECTION = "lora"

  monkeypatch.setitem(schema.SECTIONS, "lora", Lora)
  monkeypatch.setitem(specs.SECTION_SPECS, "lora", LoraSpec)
  assert (base.get_config("gsm8k").lora.planted, base.get_config("svamp").lora.planted) == (
    0.25,
    0.5,
  )
  assert specs.RunSpec.read(base.get_config("svamp")).lora.planted == 0.5
  assert "lora.planted = 0.25  # a planted key\n" in config_reference.keys("gsm8k")
  assert "| `lora.planted` | float | `0.25` (svamp: 0.5) |" in config_reference.render()


def test_a_key_added_to_the_config_only_is_refused_naming_it():
  c = base.get_config("gsm8k")
  c.lora.planted = 0.25
  with pytest.raises(specs.InvalidConfig, match=r"^config\.lora\.planted: unknown key"):
    specs.RunSpec.read(c)
  c = base.get_config("gsm8k")
  c.objective.planted = 1
  with pytest.raises(specs.InvalidConfig, match=r"^config\.objective\.planted: unknown key"):
    specs.RunSpec.read(c)
  c = base.get_config("gsm8k")
  c.planted = 1
  with pytest.raises(specs.InvalidConfig, match=r"^config\.planted: unknown key"):
    specs.RunSpec.read(c)


TASK_FILES = sorted(
  p
  for p in (pathlib.Path(base.__file__).parent).glob("*.py")
  if p.stem not in ("__init__", "base", "schema")
)


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.stem)
def test_task_files_set_only_what_differs_from_the_defaults(path):
  """Each `c.<key> = <literal>` of a task file changes its task's default (a repeated default
  would be a second place to edit when the default changes)."""
  c = importlib.import_module(f"markovian_jax.configs.{path.stem}").get_config()
  defaults = _leaves(base.get_config(c.task))
  set_ = {}
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
      key = ast.unparse(node.targets[0]).removeprefix("c.")
      try:
        set_[key] = ast.literal_eval(node.value)
      except ValueError:  # computed, not a literal
        continue
  repeated = {k: v for k, v in set_.items() if defaults[k] == v}
  assert not repeated, f"{path.name} sets its task's defaults: {repeated}"
