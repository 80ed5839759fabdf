"""Name -> variant tables, one per family of objective settings.

A family (baselines, reward kinds, policy losses, ...) keeps its variants in a `Registry` filled by
decorators in the family's module, and derives its choice tuple from the keys at the end of that
module (`BASELINES = tuple(BASELINE_REGISTRY)`). Adding a variant is one decorated function (and
its test): the config check, the error messages and the dispatch all follow from the table.

Register inside the family's module: the tuple is taken when the module has been imported, so a
variant registered later from elsewhere dispatches but is missing from the exported choices.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


def check_choice(name: str, value, choices: Iterable) -> None:
  """Raises ValueError naming the setting and listing the choices when `value` is not one."""
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


class Registry(dict):
  """A dict name -> variant (usually a function) with per-name metadata.

  `family` names the setting in error messages. `meta[name]` holds the keyword arguments given at
  registration (e.g. `min_group_size=2` for variants that need several samples per question).
  """

  def __init__(self, family: str):
    super().__init__()
    self.family = family
    self.meta: dict[str, dict[str, Any]] = {}

  def add(self, name: str, value: Any, **meta) -> Any:
    """Registers `value` (anything, including None) under `name`; returns it."""
    if name in self:
      raise ValueError(f"{self.family} {name!r} is registered twice")
    self[name] = value
    self.meta[name] = meta
    return value

  def register(self, name: str, **meta) -> Callable[[Callable], Callable]:
    """Decorator: `@REGISTRY.register("name", **meta)` adds the function and returns it as is."""

    def decorate(fn: Callable) -> Callable:
      return self.add(name, fn, **meta)

    return decorate

  def lookup(self, name: str) -> Any:
    """The variant registered under `name`; ValueError listing the choices if there is none."""
    check_choice(self.family, name, self)
    return self[name]
