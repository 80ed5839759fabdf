"""One start-up path for the command-line tools (train, evaluate, sample, ...).

    cli.run(main)                        absl app with our flag parsing and error policy
    cli.writing_to(directory, "--flag")  where the command writes (a full disk names it)
    with cli.session(allocator, cache):  logging, host allocator, jax.distributed, XLA cache
        ...

Bad input (an unknown `--config.x.y` key, an invalid value, a missing file, a malformed record, a
checkpoint that does not fit) is printed as one `error:` line naming the problem and the knob, and
the process exits with status 2, before anything expensive loads. Anything else is a bug and keeps
its traceback, except a full disk (or quota), which is one line too: nothing in the program is
wrong, and the line names the directory and the knob that moves the output.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging as pylogging
import os
import sys
from typing import Callable, Optional

from absl import app, flags, logging

from markovian_jax.runtime.errors import EXIT_BAD_INPUT, UserError, is_disk_full


class Stopped(UserError):
  """A run that stopped itself for a reason the user must act on (e.g. a training guard)."""


def fail(message) -> None:
  """Prints one `error:` line and exits with status 2."""
  text = " ".join(str(message).split()) or type(message).__name__
  print(f"error: {text}", file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def _flatten(config, prefix: str = "") -> list[str]:
  keys = []
  for key in config.keys():
    value = config[key]
    dotted = f"{prefix}{key}"
    keys.append(dotted)
    if hasattr(value, "keys") and callable(value.keys):
      keys.extend(_flatten(value, dotted + "."))
  return keys


# The configs installed with the package (markovian_jax/configs); found by path, not imported,
# so that this module stays below the configs it locates.
PACKAGED_CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"
)


def config_path(value: str) -> str:
  """`--config`'s value with a packaged config found by name when no such file exists here:
  `gsm8k`, `gsm8k.py`, `presets/8xh100`, or `configs/gsm8k.py` from any directory. A `:arg`
  suffix is kept. A path that exists, or names no packaged config, is returned unchanged."""
  file, sep, arg = value.partition(":")
  if not file or os.path.exists(file):
    return value
  name = file[len("configs/") :] if file.startswith("configs/") else file
  name = name if name.endswith(".py") else f"{name}.py"
  packaged = os.path.join(PACKAGED_CONFIGS, name)
  if os.path.isfile(packaged) and os.path.basename(name) != "__init__.py":
    return packaged + sep + arg
  return value


def packaged_config_names() -> list[str]:
  """The names `--config` accepts for the packaged configs (e.g. 'gsm8k', 'presets/8xh100')."""
  names = []
  for root, _, files in os.walk(PACKAGED_CONFIGS):
    rel = os.path.relpath(root, PACKAGED_CONFIGS)
    for f in sorted(files):
      if f.endswith(".py") and f not in ("__init__.py", "base.py"):
        names.append(os.path.normpath(os.path.join(rel, f[:-3])))
  return sorted(names)


def _resolve_config_flags(argv: list[str]) -> list[str]:
  """argv with `--config=NAME` turned into the packaged config file's path (see config_path)."""
  out = []
  for a in argv:
    if a.startswith("--config="):
      value = a.split("=", 1)[1]
      resolved = config_path(value)
      file = resolved.partition(":")[0]
      if not os.path.isfile(file):
        fail(
          f"--config={value}: no such config file, and no packaged config of that name "
          f"(packaged: {', '.join(packaged_config_names())})"
        )
      a = f"--config={resolved}"
    out.append(a)
  return out


def _load_config_file(path: str):
  """The ConfigDict a `--config=FILE[:arg]` flag names, loaded the way config_flags does."""
  file, _, arg = config_path(path).partition(":")
  spec = importlib.util.spec_from_file_location("_cli_config", file)
  if spec is None or spec.loader is None or not os.path.isfile(file):
    raise UserError(f"--config={path}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _explain(argv: list[str], error: Exception) -> str:
  """One line for a flag-parsing failure; names the unknown `--config.` key and the closest one."""
  config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  known = None
  if config_path:
    try:
      known = _flatten(_load_config_file(config_path))
    except UserError as e:  # our own refusal (e.g. an unknown variant), not config_flags' wrap
      return f"--config={config_path}: {e}"
    except Exception:  # the config file itself is broken: report the original error
      known = None
  if config_path and overrides:
    for key in overrides if known else []:
      if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean --config.{close[0]}?" if close else ""
        return f"--config.{key}: unknown config key{hint}"
  return f"{type(error).__name__}: {error}" if not isinstance(error, flags.Error) else str(error)


def _parse_flags(argv: list[str]) -> list[str]:
  argv = _resolve_config_flags(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - every parse failure is the user's input
    fail(_explain(argv, e))
    raise  # unreachable: fail() exits


# (directory, knob or None): where the running command writes its outputs (`writing_to`).
_output: Optional[tuple[str, Optional[str]]] = None


def writing_to(directory, knob: Optional[str] = None) -> None:
  """Declares that the running command writes under `directory`, which `knob` (a flag or config
  key) may send elsewhere (None: it cannot, e.g. a report written into its run): a full disk met
  while writing is then one line naming both."""
  global _output
  _output = (os.fspath(directory), knob)


def disk_full_line(error: BaseException) -> Optional[str]:
  """The one line for a full disk met while writing outputs; None when `error` is not one."""
  if not is_disk_full(error):
    return None
  name = getattr(error, "filename", None)
  if _output is None:
    what = f" writing {name}" if name else ""
    return f"no space left on device{what}: free space on that disk and run the command again"
  directory, knob = _output
  what = f" writing {name}" if name else f" writing into {directory}"
  move = f" or set {knob} to a directory on another disk" if knob else " and run the command again"
  return f"no space left on device{what}: free space in {directory}{move}"


def run(main: Callable[[], None]) -> None:
  """Runs `main()` as an absl app; UserError, FileNotFoundError and a full disk exit 2 with one
  line."""

  def _main(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments: {argv[1:]} (flags are --name=value)")
    try:
      main()
    except (UserError, FileNotFoundError) as e:
      fail(e)
    except Exception as e:  # noqa: BLE001 - a full disk, a lost process of a job: one line
      from markovian_jax.runtime import distributed

      line = disk_full_line(e)
      if line:
        fail(line)
      distributed.exit_if_peer_lost(e)
      raise

  app.run(_main, flags_parser=_parse_flags)


def quiet_library_logging() -> None:
  """absl INFO, without orbax's per-save chatter (its warnings stay)."""
  absl_logger = pylogging.getLogger("absl")
  absl_logger.setLevel(pylogging.INFO)
  absl_logger.addFilter(lambda r: r.levelno >= pylogging.WARNING or "orbax" not in r.pathname)


@contextlib.contextmanager
def session(
  allocator: Optional[str] = None,
  cache_dir: Optional[str] = None,
  cache_key: str = "config.compilation_cache_dir",
):
  """Process start-up shared by the CLIs, in the order it must happen.

  1. logging; 2. the host allocator (`allocator`: config.host_allocator; may re-execute this
  command, so nothing before it may touch a device); 3. jax.distributed when the environment
  describes a multi-process job; 4. the persistent compilation cache (`cache_dir`, '' = off).
  On exit it logs how many programs the cache loaded and compiled.
  """
  from markovian_jax.runtime import compilation_cache, distributed, host_allocator

  quiet_library_logging()
  if allocator:
    host_allocator.ensure(allocator)
  distributed.initialize()
  cache = compilation_cache.enable(cache_dir, cache_key) if cache_dir is not None else None
  yield
  if cache:
    logging.info("compilation cache %s: %s", cache, compilation_cache.stats())
