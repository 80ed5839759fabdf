#!/usr/bin/env bash
# Runs a training config on every worker of a TPU pod slice (jax.distributed auto-detects the pod).
# Usage: launch/tpu_pod.sh TPU_NAME ZONE configs/gsm8k.py [--config.key=value ...]
# Every worker must run the same command: a worker left out makes the others hang at start-up.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [overrides...]" >&2; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; shift 3
REPO_DIR=${REPO_DIR:-markovian-jax}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO_DIR && . .venv/bin/activate &&
  python -m markovian_jax.train --config=$CONFIG $*"
