#!/usr/bin/env bash
# Train on this machine: one process per GPU (2 on a machine without one), torchrun --standalone.
#
#   bash launch/run_single_node.sh                      # examples/train_gpt.py, defaults
#   NPROC=4 LOG_RANK=0,1 bash launch/run_single_node.sh --steps 1000
#
# Environment (all optional):
#   NPROC     processes on this machine (default: number of GPUs, or 2 without GPUs)
#   LOG_RANK  local ranks whose output is shown, e.g. 0 or 0,1 (default 0; torchrun's
#             --local-ranks-filter)
#   SCRIPT    training script (default examples/train_gpt.py)
# Every argument is passed on to the script. --standalone picks a free port by itself.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# GPUs this job may use, as torch counts them (honouring CUDA_VISIBLE_DEVICES, which
# nvidia-smi ignores); 0 where torch sees none or does not start
gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
NPROC=${NPROC:-$((gpus > 0 ? gpus : 2))}
LOG_RANK=${LOG_RANK:-0}
SCRIPT=${SCRIPT:-"$repo/examples/train_gpt.py"}

cmd=(torchrun --standalone --nproc_per_node "$NPROC" --local-ranks-filter "$LOG_RANK"
  "$SCRIPT" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
