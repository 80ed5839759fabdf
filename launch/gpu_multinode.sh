#!/usr/bin/env bash
# Multi-node GPU training (or evaluation) without a scheduler: run this on every node with the same
# arguments, one process per node driving all of its GPUs.
#
#   COORDINATOR=node0:12345 NNODES=2 NODE_RANK=0 launch/gpu_multinode.sh [train|evaluate] CONFIG \
#       [--config.key=value ...]
#
# COORDINATOR is node 0's address and a free port, reachable from every node; NODE_RANK is 0 on
# that node and 1..NNODES-1 on the others. They become JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
# and JAX_PROCESS_ID. Give a workdir every node sees: --config.workdir=/shared/runs/NAME or
# gs://BUCKET/run. Under SLURM use launch/gpu_slurm.sbatch instead.
set -euo pipefail

COMMAND=train
case "${1:-}" in
  train | evaluate) COMMAND=$1; shift ;;
esac
if [ $# -lt 1 ]; then
  echo "usage: COORDINATOR=host:port NNODES=N NODE_RANK=i $0 [train|evaluate] CONFIG" \
    "[overrides...]" >&2
  exit 2
fi
CONFIG=$1
shift
export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR=host:port (node 0, a free port)}
export JAX_NUM_PROCESSES=${NNODES:?set NNODES (the number of nodes)}
export JAX_PROCESS_ID=${NODE_RANK:?set NODE_RANK (0 on the coordinator node)}
# XLA takes 75% of each GPU's memory up front by default; 0.9 leaves 10% to NCCL and the CUDA
# context (lower it if NCCL reports out-of-memory).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "${PYTHON:-.venv/bin/python}" -m "markovian_jax.$COMMAND" --config="$CONFIG" "$@"
