#!/usr/bin/env bash
# Train on several machines: run this on every node with the same NNODES, RDZV_ENDPOINT and
# RDZV_ID; torchrun's c10d rendezvous on RDZV_ENDPOINT assigns the ranks.
#
#   NNODES=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=run42 bash launch/run_multi_node.sh --steps 1000
#
# Hybrid sharding (optimizer state sharded inside each node over a 2-D DeviceMesh, replicated
# across nodes, so only 1/NPROC of the gradient crosses the network) with examples/train_gpt.py:
#
#   NNODES=4 RDZV_ENDPOINT=node0:29400 bash launch/run_multi_node.sh --shard-size 8
#
# Environment:
#   NNODES         number of nodes (required)
#   RDZV_ENDPOINT  host:port of the rendezvous, a free port on one of the nodes (required)
#   RDZV_ID        job id, the same on every node and unique per job (default sharded-adamw)
#   NPROC          processes per node (default: number of GPUs, or 2 without GPUs)
#   LOG_RANK       local ranks whose output is shown (default 0; torchrun's --local-ranks-filter)
#   SCRIPT         training script (default examples/train_gpt.py)
# Every argument is passed on to the script.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# GPUs this job may use, as torch counts them (honouring CUDA_VISIBLE_DEVICES, which
# nvidia-smi ignores); 0 where torch sees none or does not start
gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
: "${NNODES:?set NNODES to the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to host:port of the rendezvous (a free port on one node)}"
RDZV_ID=${RDZV_ID:-sharded-adamw}
NPROC=${NPROC:-$((gpus > 0 ? gpus : 2))}
LOG_RANK=${LOG_RANK:-0}
SCRIPT=${SCRIPT:-"$repo/examples/train_gpt.py"}

cmd=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC"
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID"
  --local-ranks-filter "$LOG_RANK" "$SCRIPT" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
