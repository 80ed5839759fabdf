"""`make check-cuda-stack`: pip resolves requirements-gpu.txt with the PyTorch peer for Python
3.12 on Linux x86-64 (`pip install --dry-run --report`, nothing installed) and this module
checks the resolved set holds one CUDA stack: one cuDNN, one NCCL, one CUDA major.

  python -m benchmarks.gpu.cuda_stack --report build/cuda-stack.json   # check a report
  python -m benchmarks.gpu.cuda_stack --resolve --report build/cuda-stack.json

Cost, measured here (pip 23.2, an index without PEP 658 metadata): pip downloads every wheel it
resolves to read its dependencies, --use-feature=fast-deps included: 3.1-3.3 GB in 55-70 s on
this machine's mirror. It is a make target, not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_VERSION = "3.12"
# pip matches --platform tags literally: the manylinux2014 alias and every glibc 2.x a wheel of
# the stack is tagged with.
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{v}_x86_64" for v in range(17, 41)]
REQUIREMENTS = ("requirements-gpu.txt", "benchmarks/requirements-peers.txt")
# A library of the stack -> the distributions that ship it (CUDA-major-suffixed or not).
LIBRARIES = {
  "cudnn": r"nvidia-cudnn(-cu\d+)?",
  "nccl": r"nvidia-nccl(-cu\d+)?",
  "cuda runtime": r"nvidia-cuda-runtime(-cu\d+)?",
}


def target_flags(python_version: str = PYTHON_VERSION) -> list:
  """pip flags that resolve for another interpreter and platform (binary wheels only)."""
  return ["--python-version", python_version, "--only-binary=:all:"] + [
    f for p in PLATFORMS for f in ("--platform", p)
  ]


def resolve(report: str, requirements=REQUIREMENTS) -> None:
  """pip's resolver report of `requirements` for Python 3.12 x86-64, installing nothing (pip
  needs a --target for foreign platforms; --dry-run writes nothing there)."""
  cmd = [
    sys.executable,
    "-m",
    "pip",
    "install",
    "--dry-run",
    "--ignore-installed",
    "--quiet",
    "--report",
    report,
    "--target",
    os.path.join(os.path.dirname(report), "never-written"),
    *target_flags(),
  ]
  for r in requirements:
    cmd += ["-r", os.path.join(REPO, r)]
  subprocess.run(cmd, check=True, cwd=REPO)


def _normal(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def stacks(report: dict) -> dict:
  """{library: sorted "name==version" resolved for it} and {"cuda majors": sorted majors} from a
  pip installation report (its `install` list)."""
  dists = {_normal(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
  out = {
    lib: sorted(f"{n}=={v}" for n, v in dists.items() if re.fullmatch(pattern, n))
    for lib, pattern in LIBRARIES.items()
  }
  majors = {m.group(1) for n in dists if (m := re.fullmatch(r"nvidia-.*-cu(\d+)", n))}
  majors |= {v.split(".")[0] for n, v in dists.items() if n == "nvidia-cuda-runtime"}
  majors |= {m.group(1) for n in dists if (m := re.fullmatch(r"jax-cuda(\d+)-plugin", n))}
  out["cuda majors"] = sorted(majors)
  return out


def problems(found: dict) -> list:
  """What breaks "one CUDA stack": a library resolved to no or several distributions, or
  distributions of several CUDA majors."""
  out = [
    f"{lib}: {len(d)} distributions {d}"
    for lib, d in found.items()
    if lib in LIBRARIES and lib != "cuda runtime" and len(d) != 1
  ]
  if len(found["cuda majors"]) != 1:
    out.append(f"CUDA majors {found['cuda majors']}: expected one")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.gpu.cuda_stack",
    description="one cuDNN, one NCCL, one CUDA major in pip's report",
  )
  p.add_argument("--report", default=os.path.join(REPO, "build", "cuda-stack.json"))
  p.add_argument("--resolve", action="store_true", help="run pip's resolver first (~3 GB here)")
  args = p.parse_args(argv)
  if args.resolve:
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    resolve(args.report)
  with open(args.report) as f:
    found = stacks(json.load(f))
  for lib, d in found.items():
    print(f"{lib}: {', '.join(d) or '-'}")
  bad = problems(found)
  if bad:
    print("error: more than one CUDA stack: " + "; ".join(bad), file=sys.stderr)
    return 2
  print("one CUDA stack")
  return 0


if __name__ == "__main__":
  sys.exit(main())
