#!/usr/bin/env bash
# GPU smoke test, under five minutes on one GPU: the CUDA tests, then launch/gpu_smoke.py
# (no host sync in fused steps, ShardedAdamW vs torch AdamW with foreach, fused and a bf16
# reduce dtype, Inductor on odd parameter sizes, model.compile() with overlap_param_gather,
# the update bandwidth). BANDWIDTH=<GB/s> reports the update against the card's bandwidth.
# Needs the CUDA build of torch and the package installed ('pip install -e .[test]').
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q tests/test_cuda.py -rs
python launch/gpu_smoke.py ${BANDWIDTH:+--bandwidth "$BANDWIDTH"}
