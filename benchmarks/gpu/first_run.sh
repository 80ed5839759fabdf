#!/usr/bin/env bash
# The first run on a GPU machine with no network, in one command from the repository root:
#
#   bash benchmarks/gpu/first_run.sh [--results DIR] [--wheels DIR] [--tiny] [--require-gpu]
#
# 1. versions (python, pip, the packages that matter) and nvidia-smi;
# 2. the carried wheels (`make gpu-wheels` builds the folder, default build/gpu-wheels) installed
#    when the folder is there: what the image lacks, by name, from the folder only, then this
#    package with --no-deps (the image's jax / torch / transformers stay as they are);
# 3. JAX_PLATFORMS=cuda, and one `error:` line (exit 2) if JAX is not on the GPU: a failed CUDA
#    plugin would otherwise fall back to the CPU and every 8B row would time out;
# 4. the benchmark: python -m benchmarks.accelerator with what is left of the time budget after
#    the training smoke run's share;
# 5. a training smoke run: three steps of random Llama-3.1-8B weights (config.model.path=
#    random:llama-3.1-8b, no download) on the arithmetic task (generated, no download).
# All within TOTAL_S (540 s: under a 10-minute command). Everything lands in one new directory,
# DIR/run-<UTC time> (default DIR: gpu-results): a rerun writes a new one, never deletes.
#
# --tiny runs the same logic on the CPU (tests/benchmarks/test_gpu_first_run.py): JAX_PLATFORMS=cpu,
# the benchmark's --tiny model, random:tiny, and the wheels installed into DIR/run-*/site instead of
# the interpreter's site-packages. --require-gpu keeps the GPU check in --tiny mode (the stop line,
# on a CPU). Environment: PYTHON (default python3), TOTAL_S (540), TRAIN_S (the training's share,
# 150), BENCH_S (the benchmark's budget; default what TRAIN_S leaves), BENCH_FLAGS (more benchmark
# flags, e.g. --skip_torch or --row_estimates=... from a first run's row_s), STEPS (3).
set -u -o pipefail

results=gpu-results wheels=build/gpu-wheels tiny=0 require_gpu=1
while [ $# -gt 0 ]; do
  case "$1" in
    --results) results=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --tiny) tiny=1; require_gpu=0; shift ;;
    --require-gpu) require_gpu=1; shift ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python3}
total_s=${TOTAL_S:-540}
train_s=${TRAIN_S:-150}
steps=${STEPS:-3}
start=$(date +%s)
run="$results/run-$(date -u +%Y%m%dT%H%M%S)"
while [ -e "$run" ]; do run="$run-1"; done
mkdir -p "$run"
exec > >(tee -a "$run/first_run.log") 2>&1
left() { echo $((total_s - ($(date +%s) - start))); }
say() { echo "[first_run $(( $(date +%s) - start )) s] $*"; }

say "results in $run (a rerun writes a new directory)"
"$py" - <<'PY' | tee "$run/versions.txt"
import importlib.metadata as md, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("pip", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
             "orbax-checkpoint", "chex", "torch", "transformers", "tokenizers", "peft",
             "ml-collections", "tensorboardX", "gguf", "markovian-jax", "nvidia-cudnn-cu13",
             "nvidia-cudnn-cu12", "nvidia-nccl-cu13", "nvidia-nccl-cu12"):
  try:
    print(f"{name} {md.version(name)}")
  except md.PackageNotFoundError:
    print(f"{name} -")
PY
if command -v nvidia-smi >/dev/null; then
  nvidia-smi 2>&1 | tee "$run/nvidia-smi.txt"
else
  say "no nvidia-smi on this machine" | tee "$run/nvidia-smi.txt"
fi

if [ -d "$wheels" ]; then
  target=()
  if [ "$tiny" = 1 ]; then target=(--target "$run/site"); fi
  # The image's python may be marked externally managed (PEP 668); the env var is ignored by a
  # pip too old to know it. Wheel names: pip writes them lower-case, older pips did not.
  export PIP_BREAK_SYSTEM_PACKAGES=1
  shopt -s nocaseglob
  missing=()
  for name in ml_collections tensorboardx gguf; do
    if compgen -G "$wheels/${name}-*.whl" >/dev/null; then missing+=("$name"); fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} from $wheels (what the image lacks, with their missing deps)"
    if [ "$tiny" = 1 ]; then
      # A --target sees none of the interpreter's packages: resolve against them first (what the
      # real install does), then put the packages alone into the target.
      "$py" -m pip install --quiet --dry-run --no-index --find-links "$wheels" "${missing[@]}" \
        && "$py" -m pip install --quiet --no-index --no-deps --find-links "$wheels" \
          "${target[@]}" "${missing[@]}" \
        || { echo "error: installing ${missing[*]} from $wheels failed"; exit 2; }
    else
      "$py" -m pip install --quiet --no-index --find-links "$wheels" "${missing[@]}" \
        || { echo "error: installing ${missing[*]} from $wheels failed"; exit 2; }
    fi
  fi
  for whl in "$wheels"/markovian_jax-*.whl; do
    [ -e "$whl" ] || continue
    say "installing $(basename "$whl") (--no-deps: the image's versions stay)"
    "$py" -m pip install --quiet --no-index --no-deps --force-reinstall \
      ${target[@]+"${target[@]}"} "$whl" \
      || { echo "error: installing $whl failed"; exit 2; }
  done
  if [ -d "$wheels/smollm2-tokenizer" ]; then
    export MARKOVIAN_RANDOM_TOKENIZER="$wheels/smollm2-tokenizer"
  fi
  if [ "$tiny" = 1 ]; then
    say "installed into $run/site: $(ls "$run/site" | tr '\n' ' ')"
  fi
else
  say "no wheels folder at $wheels: using the interpreter's packages as they are"
fi

if [ "$require_gpu" = 1 ]; then
  export JAX_PLATFORMS=cuda
else
  export JAX_PLATFORMS=cpu
fi
backend=$("$py" -c 'import jax; print(jax.default_backend(), jax.devices()[0].device_kind)' \
  2>"$run/jax_backend.err") || backend=""
if [ "$require_gpu" = 1 ] && [ "${backend%% *}" != gpu ]; then
  why=$(grep -v '^\s*$' "$run/jax_backend.err" | tail -1 | cut -c1-240)
  echo "error: JAX is not on the GPU with JAX_PLATFORMS=cuda (${why:-backend ${backend:-none}});" \
    "stopping before the benchmark: check jax-cuda13-plugin against nvidia-smi's driver"
  exit 2
fi
say "JAX on ${backend}"

bench_s=${BENCH_S:-$(( $(left) - train_s - 30 ))}
bench=(--out "$run/bench" --budget_s "$bench_s")
if [ "$tiny" = 1 ]; then bench+=(--tiny --questions=1 --batches=1 --repeats=1); fi
read -r -a extra <<< "${BENCH_FLAGS:-}"
bench+=(${extra[@]+"${extra[@]}"})
if [ "$bench_s" -gt 30 ]; then
  say "benchmark with a budget of $bench_s s"
  timeout -k 15 $((bench_s + 20)) "$py" -m benchmarks.accelerator "${bench[@]}"
  say "benchmark exit $?"
else
  say "no time left for the benchmark ($bench_s s)"
fi

if [ "$tiny" = 1 ]; then
  train=(--config=configs/demo.py --config.model.path=random:tiny --config.sampling.cot_length=8
         --config.train.group_size=4 --config.eval.answer_max_tokens=4)
else
  train=(--config=configs/arithmetic.py --config.model.path=random:llama-3.1-8b
         --config.sampling.cot_length=64 --config.train.group_size=8)
fi
train+=("--config.workdir=$run/train" "--config.train.num_steps=$steps"
        --config.train.questions_per_step=1 --config.train.eval_every=100000
        --config.train.checkpoint_every=100000 --config.eval.num_examples=4
        --config.eval.selection_size=4 --config.eval.batch_size=4)
limit=$(( $(left) - 5 ))
if [ "$limit" -gt 20 ]; then
  say "training smoke run, $steps steps, limit $limit s"
  timeout -k 10 "$limit" "$py" -m markovian_jax.train "${train[@]}"
  code=$?
  say "training exit $code"
else
  say "no time left for the training smoke run"
  code=124
fi
say "done in $(( $(date +%s) - start )) s; everything is in $run"
exit "$code"
