#!/usr/bin/env bash
# Sets up, then trains or evaluates on, every worker of a Cloud TPU VM slice (one JAX process per
# worker; JAX finds the slice from the TPU metadata server).
#
#   launch/tpu_pod.sh setup    TPU_NAME ZONE     copy this checkout to every worker and install it
#   launch/tpu_pod.sh train    TPU_NAME ZONE CONFIG [--config.key=value ...]
#   launch/tpu_pod.sh evaluate TPU_NAME ZONE CONFIG [--flag=value ...]
#
# Every worker runs the same command (gcloud ... ssh --worker=all): a worker left out keeps the
# others waiting at start-up until MARKOVIAN_DISTRIBUTED_TIMEOUT (300 s). Each worker keeps its
# own log in ~/$REPO_DIR/logs/<command>-<hostname>.log; the terminal shows them all interleaved.
# Workers do not share a disk: give a workdir every worker sees, --config.workdir=gs://BUCKET/run.
#
# Environment: REPO_DIR (on each worker, relative to its home; default markovian-jax), PYTHON
# (the workers' Python >= 3.11; default python3), GCLOUD_FLAGS (more gcloud flags, e.g.
# "--project=my-project --tunnel-through-iap"), HF_TOKEN (at setup: copied to each worker's
# ~/.cache/huggingface/token, for gated models such as meta-llama/Llama-3.1-8B-Instruct).
set -euo pipefail

usage() {
  sed -n '5,7p' "$0" | sed 's/^# *//' >&2
  exit 2
}
[ $# -ge 3 ] || usage
COMMAND=$1 TPU_NAME=$2 ZONE=$3
shift 3
REPO_DIR=${REPO_DIR:-markovian-jax}
PYTHON=${PYTHON:-python3}
# gcloud's flags for every worker; the guarded expansion keeps bash 3.2 (macOS) happy under -u.
read -r -a extra <<< "${GCLOUD_FLAGS:-}"
TARGET=(--zone "$ZONE" --worker=all ${extra[@]+"${extra[@]}"})
ROOT=$(cd "$(dirname "$0")/.." && pwd)

# The same install as the README's "Running on GPUs and TPU pods" section.
INSTALL_TPU="$PYTHON -m venv .venv && .venv/bin/pip install -q -r requirements.txt -r requirements-tpu.txt"

on_all_workers() {  # $1: the remote bash command line
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TARGET[@]}" --command "$1"
}

case "$COMMAND" in
  setup)
    [ $# -eq 0 ] || usage
    archive=$(mktemp)
    trap 'rm -f "$archive"' EXIT
    # The working tree as git sees it (committed or not, ignored files left out).
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
      tar --null -T - -czf "$archive")
    copy_to_workers() {  # $1: local file, $2: path on every worker (relative to its home)
      gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" "${TARGET[@]}"
    }
    copy_to_workers "$archive" markovian-jax.tar.gz
    if [ -n "${HF_TOKEN:-}" ]; then  # a file, so the token never shows on a command line
      token_file=$(mktemp)
      trap 'rm -f "$archive" "$token_file"' EXIT
      printf '%s' "$HF_TOKEN" > "$token_file"
      on_all_workers "mkdir -p ~/.cache/huggingface"
      copy_to_workers "$token_file" .cache/huggingface/token
      on_all_workers "chmod 600 ~/.cache/huggingface/token"
    fi
    on_all_workers "set -euo pipefail; mkdir -p $(printf %q "$REPO_DIR")
      tar -xzf markovian-jax.tar.gz -C $(printf %q "$REPO_DIR") && rm markovian-jax.tar.gz
      cd $(printf %q "$REPO_DIR") && $INSTALL_TPU && echo \"\$(hostname): installed\""
    ;;
  train | evaluate)
    [ $# -ge 1 ] || usage
    CONFIG=$1
    shift
    case " $* " in
      *" --config.workdir=gs://"* | *" --output_dir=gs://"* | *" --checkpoint_dir=gs://"*) ;;
      *) echo "warning: no gs:// workdir given; each worker writes to its own disk" >&2 ;;
    esac
    # Arguments reach the workers' shell quoted as they were given here.
    args=$(printf ' %q' "--config=$CONFIG" "$@")
    on_all_workers "set -o pipefail; cd $(printf %q "$REPO_DIR") && mkdir -p logs &&
      .venv/bin/python -m markovian_jax.$COMMAND$args 2>&1 |
      tee \"logs/$COMMAND-\$(hostname).log\""
    ;;
  *) usage ;;
esac
