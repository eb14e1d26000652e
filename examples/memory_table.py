"""Peak memory per rank: DDP + AdamW, ZeroRedundancyOptimizer, DeepSpeed ZeRO-2 (if installed)
and ShardedAdamW's modes, each alone on a 50.4M-parameter MLP (12 x Linear(2048, 2048)).

Run (glibc must hand freed memory back to the kernel, or the CPU peak over-counts):

    MALLOC_MMAP_THRESHOLD_=131072 torchrun --standalone --nproc_per_node 4 examples/memory_table.py

Each setup trains 3 steps alone; its peak is the largest rank's, measured by the system
(``sharded_adamw.tools.peak``: the process's resident high-water mark on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) above the bare model, in bytes per parameter,
with what ``sharded-adamw estimate``'s peak model predicts for it beside each row it models.
The same table is ``python -m benchmarks --peak-memory``.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist

# the benchmark is not installed with the package: it is read from this checkout
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import peak_markdown, peak_table  # noqa: E402
from sharded_adamw.tools.peak import PeakMemory  # noqa: E402


def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = device or torch.device("cpu")
    world = dist.get_world_size()
    rows = peak_table(2048, 12, 8, 3, device)
    if dist.get_rank() == 0:
        print(f"world size {world}, {dist.get_backend()}\n")
        print(peak_markdown(rows, PeakMemory(device).method))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
