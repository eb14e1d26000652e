"""The peak-memory table: each contender alone on the square MLP, its peak per rank measured
by the system (``sharded_adamw.tools.peak``) above the bare model, in bytes per parameter."""

from __future__ import annotations

import copy
import gc

import torch
import torch.distributed as dist
import torch.nn as nn

from sharded_adamw.tools.peak import PeakMemory

from .contenders import CONTENDERS
from .models import mlp
from .run import agree, skip_reason

PEAK_ROWS = [  # (contender, parameter dtype) rows of the peak-memory table
    ("DDP + AdamW", torch.float32),
    ("DDP + ZeroRedundancyOptimizer", torch.float32),
    ("DeepSpeed ZeRO-2", torch.float32),
    ("ShardedAdamW (attach)", torch.float32),
    ("ShardedAdamW (attach, bucket view)", torch.float32),
    ("ShardedAdamW (standalone)", torch.float32),
    ("ShardedAdamW (attach, full_grads)", torch.float32),
    ("ShardedAdamW (standalone, full_grads)", torch.float32),
    ("ShardedAdamW (attach)", torch.bfloat16),
    ("ShardedAdamW (attach, bucket view)", torch.bfloat16),
    ("ShardedAdamW (standalone)", torch.bfloat16),
]


def measure_peak(
    name: str, dtype: torch.dtype, base: nn.Module, batches: list, device: torch.device
) -> float | str:
    """Peak bytes per parameter (the largest rank's) above the bare model while contender
    ``name`` trains on ``batches`` (loss: mean square of the output), or the reason it was
    skipped. What the contender's construction leaves allocated counts; its construction-time
    transients (DDP's initial broadcast, DeepSpeed's flattening) do not. Collective: every
    rank runs it with the same arguments."""
    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    count = sum(p.numel() for p in model.parameters())
    meter = PeakMemory(device)
    gc.collect()
    dist.barrier()
    meter.reset()
    error, trainer = None, None
    try:
        trainer = CONTENDERS[name](model, device)
        gc.collect()
        meter.reset_peak()
        for x in batches:
            trainer.backward(trainer.net(x.to(dtype)).float().square().mean())
            trainer.step()
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
        error = skip_reason(e)
    peak = meter.peak()
    del trainer, model
    gc.collect()
    error = agree(error)
    if error:
        return error
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, peak)
    return max(every) / count


def peak_table(
    width: int, layers: int, batch: int, steps: int, device: torch.device
) -> list[tuple[str, str, float | str]]:
    """``(contender, dtype, bytes per parameter or skip reason)`` for every ``PEAK_ROWS`` row,
    each contender alone, on ``mlp(width, layers)`` with ``steps`` batches of ``batch`` rows."""
    g = torch.Generator().manual_seed(dist.get_rank())
    # One warm-up of every row on a tiny model first: the first optimizer built in a process
    # imports torch._dynamo and friends (about 150 MB resident), and peers load their own
    # modules; none of that is per-parameter memory, so no row may pay it.
    tiny = mlp(64, 2)
    warm = [torch.randn(batch, 64, generator=g).to(device)]
    for name, dtype in PEAK_ROWS:
        measure_peak(name, dtype, tiny, warm, device)
    base = mlp(width, layers)
    batches = [torch.randn(batch, width, generator=g).to(device) for _ in range(steps)]
    return [
        (name, str(dtype).removeprefix("torch."), measure_peak(name, dtype, base, batches, device))
        for name, dtype in PEAK_ROWS
    ]
