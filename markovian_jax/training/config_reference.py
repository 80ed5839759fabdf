"""The configuration reference (docs/configuration.md), written from the code that defines it.

    python -m markovian_jax.training.config_reference > docs/configuration.md
    python -m markovian_jax.training.config_reference --keys [TASK]   # key = default  # what

Each key of `configs/base.get_config` becomes one row: its type (what `--config.x.y=` must
parse as), its default (the value most tasks get, then the tasks that differ), the choices the
typed specs accept and a description. Nothing here restates a value:

  defaults     `base.get_config(task)` for every task of `data.tasks.TASKS`
  choices      the choice lists the validators name: `self.choice("key", CHOICES)` in
               `training/specs.py`, `check_choice(..., self.key, CHOICES)` in
               `objectives/config.py`, and `<config or spec>.key not in CHOICES` tests, each
               expression evaluated in its own module
  description  the key's `knob(default, description)` in `configs/schema.py`

`tests/repo/test_docs.py` regenerates the page and fails when the committed file differs.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import inspect
import sys
from typing import Any, Iterator

from markovian_jax.configs import base, schema
from markovian_jax.data import tasks as tasks_lib
from markovian_jax.objectives import config as objective_config
from markovian_jax.runtime import presets
from markovian_jax.training import specs

COMMAND = "python -m markovian_jax.training.config_reference > docs/configuration.md"
# The task whose name a per-task string default carries (`workdir = runs/gsm8k`).
_TASK_PLACEHOLDER = "<task>"


def _leaves(c, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) of every leaf of a ConfigDict, in the order the file sets them."""
  for key, value in c.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _choice_expressions(module) -> dict[tuple[str, str], ast.expr]:
  """(class name, field) -> the choices expression its validator checks the field against."""
  found = {}
  for cls in ast.walk(ast.parse(inspect.getsource(module))):
    if not isinstance(cls, ast.ClassDef):
      continue
    for node in ast.walk(cls):
      if isinstance(node, ast.Call):
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        args = node.args
        if name == "choice" and len(args) == 2 and isinstance(args[0], ast.Constant):
          found[(cls.name, args[0].value)] = args[1]
        elif (
          name == "check_choice"
          and len(args) == 3
          and isinstance(args[1], ast.Attribute)
          and isinstance(args[1].value, ast.Name)
          and args[1].value.id == "self"
        ):
          found[(cls.name, args[1].attr)] = args[2]
      elif (
        isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.ops[0], ast.NotIn)
        and isinstance(node.left, ast.Attribute)
        and isinstance(node.left.value, ast.Name)
        and node.left.value.id in ("self", "c")
      ):
        found.setdefault((cls.name, node.left.attr), node.comparators[0])
  return found


def _evaluate(expr: ast.expr, module) -> tuple:
  value = eval(
    compile(ast.Expression(expr), module.__name__, "eval"),  # noqa: S307
    vars(module),
  )
  return tuple(sorted(value)) if isinstance(value, dict) else tuple(value)


def choices() -> dict[str, tuple]:
  """Dotted config key -> the values its validator accepts (keys with a fixed list only)."""
  sections = {
    f.type if isinstance(f.type, str) else f.type.__name__: f.name
    for f in dataclasses.fields(specs.RunSpec)
  }
  out = {}
  for (cls, field), expr in _choice_expressions(specs).items():
    if cls == "RunSpec":
      out[field] = _evaluate(expr, specs)
    elif cls in sections:
      out[f"{sections[cls]}.{field}"] = _evaluate(expr, specs)
  for (cls, field), expr in _choice_expressions(objective_config).items():
    if cls == "ObjectiveConfig":
      out[f"objective.{field}"] = _evaluate(expr, objective_config)
  return out


def descriptions() -> dict[str, str]:
  """Dotted key -> its description in configs/schema.py."""
  out = {f.name: f.metadata["description"] for f in dataclasses.fields(schema.Run)}
  for name, section in schema.SECTIONS.items():
    out.update({f"{name}.{f.name}": f.metadata["description"] for f in dataclasses.fields(section)})
  return out


def _shown(value) -> str:
  if isinstance(value, str):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return "(" + ", ".join(_shown(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return repr(value)


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def per_task_defaults() -> dict[str, str]:
  """Key -> its default as shown: the value most tasks get, then the tasks that differ."""
  values = collections.defaultdict(dict)
  for task in tasks_lib.TASKS:
    for key, value in _leaves(base.get_config(task)):
      if isinstance(value, str) and task in value:
        value = value.replace(task, _TASK_PLACEHOLDER)
      values[key][task] = value
  shown = {}
  for key, by_task in values.items():
    if key == "task":
      shown[key] = "the config file's task"
      continue
    counts = collections.Counter(_shown(v) for v in by_task.values())
    common = counts.most_common(1)[0][0]  # ties: the first task's value
    others = [f"{t}: {_shown(v)}" for t, v in by_task.items() if _shown(v) != common]
    shown[key] = f"`{common}`" + (f" ({', '.join(others)})" if others else "")
  return shown


def _type_name(value) -> str:
  return "tuple" if isinstance(value, (tuple, list)) else type(value).__name__


def _variant_rows() -> list[str]:
  rows = []
  for name, (what, changes) in base.VARIANTS.items():
    sets = []
    for key, value in changes.items():
      if callable(value):
        computed = value(base.get_config("gsm8k"))
        sets.append(", ".join(f"`{k}` (gsm8k: {_shown(v)})" for k, v in computed.items()))
      else:
        sets.append(f"`{key}={_shown(value)}`")
    rows.append(f"| `{name}` | {_cell(what)} | {'; '.join(sets) or 'nothing'} |")
  return rows


def _preset_rows() -> list[str]:
  rows = []
  for p in presets.PRESETS.values():
    memory = f"{p.memory_gib:g}" if p.memory_gib else "read from the device"
    rows.append(f"| `{p.name}` | {p.chip or '-'} | {p.hosts} | `{p.mesh}` | {memory} |")
  return rows


def render() -> str:
  """The whole page, as markdown."""
  defaults = per_task_defaults()
  described = descriptions()
  accepted = choices()
  first = base.get_config("gsm8k")
  lines = [
    "<!-- Generated from the code; do not edit. Regenerate with:",
    f"     {COMMAND} -->",
    "",
    "# Configuration reference",
    "",
    "Every key of a run config, as `configs/base.py` builds it and `training/specs.py` checks "
    "it. Set any of them on the command line as `--config.<key>=<value>` (the value must parse "
    "as the type shown); a key that does not exist, or a value outside its choices, stops the "
    "command before anything loads, naming the key. Defaults that depend on the task show the "
    "value most tasks get, then the tasks that differ. Each key, its default and its "
    "description are written once, in `configs/schema.py`; `python -m "
    "markovian_jax.training.config_reference --keys [TASK]` lists them in a terminal.",
    "",
  ]
  by_section = collections.OrderedDict()
  for key, value in _leaves(first):
    section = key.partition(".")[0] if "." in key else ""
    by_section.setdefault(section, []).append((key, value))
  for section, rows in by_section.items():
    lines += [
      f"## {section or 'Top level'}",
      "",
      "| key | type | default | choices | description |",
      "|---|---|---|---|---|",
    ]
    for key, value in rows:
      allowed = ", ".join(f"`{c}`" for c in accepted.get(key, ()))
      lines.append(
        f"| `{key}` | {_type_name(value)} | {_cell(defaults[key])} | "
        f"{_cell(allowed)} | {_cell(described.get(key, ''))} |"
      )
    lines.append("")
  lines += [
    "## Variants",
    "",
    "`--config=<file>:<variant>` applies one of these on top of the task's defaults "
    "(recorded as `variant`).",
    "",
    "| variant | what it is | keys it sets |",
    "|---|---|---|",
    *_variant_rows(),
    "",
    "## Presets",
    "",
    "`mesh.preset=<name>` (or `--config=configs/presets/<name>.py[:task]`, which also "
    "sets the `train.questions_per_step` the mesh needs) picks the mesh "
    "`(data, fsdp, tensor)` and the memory the start-up plan assumes per chip.",
    "",
    "| preset | chip | hosts | mesh | GiB per chip |",
    "|---|---|---|---|---|",
    *_preset_rows(),
    "",
  ]
  return "\n".join(lines)


def keys(task: str = "gsm8k") -> str:
  """Every key of `task`'s config, one a line: `key = default  # description`."""
  described = descriptions()
  return "".join(
    f"{key} = {_shown(value)}  # {described[key]}\n"
    for key, value in _leaves(base.get_config(task))
  )


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["--keys"]:
    sys.stdout.write(keys(*argv[1:2]))
  else:
    sys.stdout.write(render())


if __name__ == "__main__":
  main()
