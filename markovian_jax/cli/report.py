"""See a run: figures and a written analysis of one run or of many, live or finished.

  python -m markovian_jax.report --workdir=runs/gsm8k          # one run (config.workdir)
  python -m markovian_jax.report --workdir=runs                # every run below, compared

A parent's report adds results_table.md (the paper's table) and methods_table.md (one row per
variant, seeds pooled: a method beside its _markovian twin).

What the report holds: `markovian_jax.reporting`.
"""

from __future__ import annotations

from markovian_jax.reporting.markdown import write_report
from markovian_jax.runtime import cli


def _define_flags():
  """The CLI's flags, defined only when run as a program so that importing this module (e.g.
  from benchmarks/learning.py, which has its own --workdir) defines none."""
  from absl import flags

  flags.DEFINE_string(
    "workdir",
    None,
    "A run directory, or a directory whose subdirectories are runs; the report is written into it.",
  )
  flags.DEFINE_integer("examples", 2, "Example questions shown per logged step.")


def main():
  from absl import flags

  from markovian_jax.runtime.errors import UserError

  f = flags.FLAGS
  if not f.workdir:
    raise UserError("--workdir is required (a run directory or a parent of runs)")
  if f.examples < 0:
    raise UserError(f"--examples must be >= 0, got {f.examples}")
  cli.writing_to(f.workdir)
  report = write_report(f.workdir, f.examples)
  for p in report.figures:
    print(f"figure: {p}")
  print(f"report: {report.path}")


def cli_main():
  """The `markovian-report` console script; the same as `python -m markovian_jax.report`."""
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  cli_main()
