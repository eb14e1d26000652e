#!/usr/bin/env bash
# Fault-tolerant training: when any worker fails, torchrun stops them all and starts the whole
# group again, up to MAX_RESTARTS times. Single node (--standalone) unless RDZV_ENDPOINT is set;
# then, as in run_multi_node.sh, run it on every node, and NNODES may be a range MIN:MAX so
# that the job goes on with the nodes that are left.
#
#   MAX_RESTARTS=3 bash launch/run_elastic.sh --steps 1000
#
# A restarted job starts the script from the top, possibly with another RANK and WORLD_SIZE
# (TORCHELASTIC_RESTART_COUNT tells it which attempt it is): the script must load its latest
# checkpoint before it trains, and that checkpoint must not depend on the old world size
# (ShardedAdamW.state_dict() is torch.optim.AdamW's format and loads at any world size).
# examples/elastic_train.py (the default here) saves sharded checkpoints and resumes from the
# latest; examples/train_gpt.py saves none and would start over.
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is set because on torch 2.13 restarted workers can
# otherwise read a killed worker's stale address from the shared rendezvous store and fail to
# connect (pytorch/pytorch#135712).
#
# Environment (all optional):
#   MAX_RESTARTS   restarts of the worker group before giving up (default 3)
#   NPROC          processes per node (default: number of GPUs, or 2 without GPUs)
#   LOG_RANK       local ranks whose output is shown (default 0; torchrun's --local-ranks-filter)
#   SCRIPT         training script (default examples/elastic_train.py)
#   RDZV_ENDPOINT  host:port of a c10d rendezvous for several nodes, with NNODES (default 1)
#                  and RDZV_ID (default sharded-adamw)
# Every argument is passed on to the script.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# GPUs this job may use, as torch counts them (honouring CUDA_VISIBLE_DEVICES, which
# nvidia-smi ignores); 0 where torch sees none or does not start
gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
MAX_RESTARTS=${MAX_RESTARTS:-3}
NPROC=${NPROC:-$((gpus > 0 ? gpus : 2))}
LOG_RANK=${LOG_RANK:-0}
SCRIPT=${SCRIPT:-"$repo/examples/elastic_train.py"}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  nodes=(--nnodes "${NNODES:-1}" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
    --rdzv-id "${RDZV_ID:-sharded-adamw}")
else
  nodes=(--standalone)
fi

cmd=(torchrun "${nodes[@]}" --nproc_per_node "$NPROC" --max-restarts "$MAX_RESTARTS"
  --local-ranks-filter "$LOG_RANK" "$SCRIPT" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
