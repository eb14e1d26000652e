"""Elastic training that survives a crash: a sharded checkpoint every few steps, resumed at start.

    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1   # see below
    torchrun --standalone --nproc_per_node 2 --max-restarts 1 examples/elastic_train.py
    CRASH_AT_STEP=5 torchrun --standalone --nproc_per_node 2 --max-restarts 1 \\
        examples/elastic_train.py        # rank 1 dies at step 5; torchrun restarts every rank
    python examples/elastic_train.py     # one process

A small MLP learns a fixed function. Each rank draws its batch from a generator seeded by the
step and the rank, so a resumed run sees exactly the batches it would have seen. Every
``--save-every`` steps, ``save_checkpoint`` writes the model, the sharded optimizer state, the
step counter and the LR scheduler into one checkpoint: each rank writes only the state it owns,
and the checkpoint at ``--checkpoint`` is replaced only once the new one is complete. At start,
if a complete checkpoint exists, every rank loads it (``load_checkpoint``, which reshards if
torchrun restarted with another number of ranks) and carries on from its step. At the end
rank 0 writes the parameters to ``--out``.

``CRASH_AT_STEP`` makes rank 1 kill itself with SIGKILL, as the OOM killer would, just before
that step, on the first attempt only (``TORCHELASTIC_RESTART_COUNT == 0``). torchrun then
restarts every rank and they resume from the last checkpoint; the final parameters are bitwise
those of a run without the crash (tests/test_checkpoint.py checks it).

``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (read by torchrun itself) gives each attempt its own
store. By default on torch 2.13 the workers share torchrun's rendezvous store across restarts,
and a restarted worker can read the address a killed worker published there
(pytorch/pytorch#135712): gloo then fails with "connectFullMesh ... Connection refused", or
hangs. Seen here in 6 restarts of 10 without it, and in none of 20 with it.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW, checkpoint_exists, load_checkpoint, save_checkpoint

DIM, HIDDEN = 13, 61  # sizes that no world size divides evenly


def batch(step: int, rank: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(n, DIM, generator=g)
    return x, torch.sin(3 * x[:, :1]) * x[:, 1:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/elastic")
    parser.add_argument("--out", default="elastic_final.pt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    crash_at = int(os.environ.get("CRASH_AT_STEP", "-1"))

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(DIM, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, 1),
    )
    net = DDP(model) if distributed else model
    opt = ShardedAdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    if distributed:
        opt.attach(net)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))

    start = 0
    if checkpoint_exists(args.checkpoint):  # scheduler first, so that loading overrides it
        extra = load_checkpoint(args.checkpoint, net, opt)
        sched.load_state_dict(extra["scheduler"])
        start = extra["step"]
        if rank == 0:
            print(f"resuming from step {start} (attempt {attempt})", flush=True)

    for step in range(start, args.steps):
        if step == crash_at and rank == 1 and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch(step, rank)
        loss = F.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            extra = {"step": step + 1, "scheduler": sched.state_dict()}
            save_checkpoint(args.checkpoint, net, opt, extra=extra)
            if rank == 0:
                print(f"step {step + 1}: loss {loss.item():.5f}, checkpoint saved", flush=True)

    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, args.out)
    if distributed:
        # Free what holds the process group (DDP, and the optimizer's hooks and references form
        # cycles) before destroying it: a gloo group left to the interpreter's teardown can
        # abort the process at exit ("terminate called without an active exception"; about one
        # run in eight here, plain DDP + torch AdamW included; none in 40 with this).
        del net, opt, sched
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
