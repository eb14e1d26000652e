"""Measure bytes per parameter on each rank: DDP + AdamW against ShardedAdamW's modes.

Run: ``torchrun --standalone --nproc_per_node 2 examples/memory_table.py`` (or 4 ranks).
Everything is counted from live tensors after ``backward()`` and before ``step()``, when
gradients and optimizer state are both held: parameters, gradients (``p.grad``, plus the
optimizer's gradient shards), optimizer state (plus fp32 master weights). DDP's own bucket
buffers are not reachable from Python; they are the same size as the gradients for DDP +
AdamW and for ShardedAdamW attached to DDP (the note under the table says so).

The bf16 baseline is what a DDP user writes by hand: a bf16 model under DDP (bf16 gradients)
and torch AdamW on an fp32 master copy with fp32 master gradients.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(5003, 333), nn.Linear(333, 997), nn.LayerNorm(997))


def run(mode: str, dtype: torch.dtype) -> dict:
    net = model().to(dtype)
    params = list(net.parameters())
    x = torch.randint(0, 5003, (8, 4))
    if mode == "DDP + AdamW":
        ddp = DDP(net)
        masters = params
        if dtype != torch.float32:
            masters = [nn.Parameter(p.detach().float()) for p in params]
        opt = torch.optim.AdamW(masters)
        ddp(x).float().square().mean().backward()
        if masters is not params:
            for m, p in zip(masters, params):
                m.grad = p.grad.float()
        opt.step()  # AdamW creates its state lazily: measure after one step
        ddp(x).float().square().mean().backward()
        if masters is not params:
            for m, p in zip(masters, params):
                m.grad = p.grad.float()
        grads = nbytes(p.grad for p in params)
        if masters is not params:
            grads += nbytes(m.grad for m in masters)
        state = nbytes(t for s in opt.state.values() for t in s.values())
        if masters is not params:  # the fp32 master copy counts as optimizer state
            state += nbytes(masters)
        return {"params": nbytes(params), "grads": grads, "state": state}
    opt = ShardedAdamW(params)
    fwd = net
    if mode == "ShardedAdamW attached":
        fwd = DDP(net)
        opt.attach(fwd)
    fwd(x).float().square().mean().backward()
    opt._finish_reduction()
    mem = opt.memory()
    grads = nbytes(p.grad for p in params) + mem["grad_shard_bytes"]
    return {"params": nbytes(params), "grads": grads, "state": mem["state_allocated_bytes"]}


def main() -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    P = sum(p.numel() for p in model().parameters())
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("DDP + AdamW", "ShardedAdamW attached", "ShardedAdamW standalone"):
            r = run(mode, dtype)
            total = r["params"] + r["grads"] + r["state"]
            rows.append((str(dtype).split(".")[1], mode, r, total / P))
    if rank == 0:
        print(f"{P:,} parameters, world size {world}, bytes per parameter on rank 0 (measured)\n")
        print("| dtype | setup | params | grads | optimizer state | total |")
        print("|---|---|---:|---:|---:|---:|")
        for dt, mode, r, per in rows:
            print(
                f"| {dt} | {mode} | {r['params'] / P:.2f} | {r['grads'] / P:.2f} "
                f"| {r['state'] / P:.2f} | {per:.2f} |"
            )
        print("\nDDP's bucket buffers (one gradient's worth in the reduce dtype) come on top for")
        print("DDP + AdamW and for ShardedAdamW attached; standalone ShardedAdamW has none.")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
