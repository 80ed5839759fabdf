#!/usr/bin/env bash
# Multi-host GPU launch: run this on every node (e.g. from SLURM or by hand) with the same arguments.
# Usage: COORDINATOR=host0:12345 NNODES=2 NODE_RANK=0 launch/gpu_multinode.sh configs/gsm8k.py [overrides]
# Under SLURM the rank and node count come from SLURM_NODEID / SLURM_NNODES.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: COORDINATOR=host:port NNODES=N NODE_RANK=i $0 CONFIG [overrides...]" >&2; exit 2
fi
CONFIG=$1; shift
export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR=host:port (node 0)}
export JAX_NUM_PROCESSES=${NNODES:-${SLURM_NNODES:?set NNODES}}
export JAX_PROCESS_ID=${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK}}
# Leave headroom for NCCL buffers; XLA preallocates 75% by default.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# If collectives hang on a node without NVLink peer access, try NCCL_P2P_DISABLE=1.
exec python -m markovian_jax.train --config="$CONFIG" "$@"
