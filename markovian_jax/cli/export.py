"""Export a training checkpoint's LoRA: a PEFT adapter, or merged HF weights.

  python -m markovian_jax.export --checkpoint_dir=runs/gsm8k/checkpoints --best \
      --format=peft --out=runs/gsm8k/adapter
  python -m markovian_jax.export --checkpoint_dir=runs/gsm8k/checkpoints --step=4000 \
      --format=merged --out=runs/gsm8k/merged [--model=PATH] [--dtype=bfloat16]

What each format holds and how --best chooses: `markovian_jax.training.export`.
"""

from __future__ import annotations

from markovian_jax.runtime import cli
from markovian_jax.training.export import FORMATS, ExportError, export


def _define_flags():
  """Defined only when run as a program (importing this module defines no flags)."""
  from absl import flags

  flags.DEFINE_string("checkpoint_dir", None, "Orbax checkpoint directory of a training run.")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_bool("best", False, "Export the best saved step by validation score.")
  flags.DEFINE_enum(
    "format",
    "peft",
    list(FORMATS),
    "peft: a PEFT LoRA adapter; merged: HF weights with the adapter folded in.",
  )
  flags.DEFINE_string("out", None, "Directory to write (new or empty, unless --overwrite).")
  flags.DEFINE_string("model", None, "Base model (default: the checkpoint's config.model.path).")
  flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "Merged weights' dtype (default: the run's config.model.dtype).",
  )
  flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out.")


def main():
  from absl import flags

  f = flags.FLAGS
  if not f.checkpoint_dir:
    raise ExportError("--checkpoint_dir is required")
  if f.out:
    cli.writing_to(f.out, "--out")
  record = export(
    f.checkpoint_dir,
    f.out,
    fmt=f.format,
    step=f.step,
    best=f.best,
    model=f.model,
    dtype=f.dtype,
    overwrite=f.overwrite,
  )
  print(f"exported step {record['step']} ({record['chosen_by']}) as {record['format']} to {f.out}")


def cli_main():
  """The `markovian-export` console script; the same as `python -m markovian_jax.export`."""
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  cli_main()
