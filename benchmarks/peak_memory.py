"""The peak-memory table: each contender alone on the square MLP, its peak per rank measured
by the system (``sharded_adamw.tools.peak``) above the bare model, in bytes per parameter,
beside what ``sharded-adamw estimate``'s peak model (``estimate.estimate_peak``) predicts for
it where it models the setup (``PEAK_ESTIMATES``).

The int8-state rows are contenders of the timed benchmark too (their step time beside fp32
state's); bf16 state and master remainders are rows of this table only
(``PEAK_CONTENDERS``)."""

from __future__ import annotations

import copy
import functools
import gc
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from sharded_adamw.tools.estimate import estimate_peak, model_tensors
from sharded_adamw.tools.peak import PeakMemory

from .contenders import (
    CONTENDERS,
    Trainer,
    sharded_standalone,
    weight_decay_groups,
)
from .models import mlp
from .run import agree, skip_reason

INT8 = {"state_dtype": torch.int8}
BF16_STATE = {"state_dtype": torch.bfloat16}
REMAINDERS_INT8 = {"state_dtype": torch.int8, "master_remainders": True}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}

PEAK_CONTENDERS: dict[str, Callable[[nn.Module, torch.device], Trainer]] = CONTENDERS | {
    "ShardedAdamW (standalone, bf16 state)": functools.partial(sharded_standalone, **BF16_STATE),
    "ShardedAdamW (standalone, int8 state, master remainders)": functools.partial(
        sharded_standalone, **REMAINDERS_INT8
    ),
}

PEAK_ROWS = [  # (contender, parameter dtype) rows of the peak-memory table
    ("DDP + AdamW", torch.float32),
    ("DDP + ZeroRedundancyOptimizer", torch.float32),
    ("DeepSpeed ZeRO-2", torch.float32),
    ("ShardedAdamW (attach)", torch.float32),
    ("ShardedAdamW (attach, bucket view)", torch.float32),
    ("ShardedAdamW (standalone)", torch.float32),
    ("ShardedAdamW (attach, full_grads)", torch.float32),
    ("ShardedAdamW (standalone, full_grads)", torch.float32),
    ("ShardedAdamW (standalone, bf16 state)", torch.float32),
    ("ShardedAdamW (standalone, int8 state)", torch.float32),
    ("ShardedAdamW (attach, int8 state)", torch.float32),
    ("ShardedAdamW (attach)", torch.bfloat16),
    ("ShardedAdamW (attach, bucket view)", torch.bfloat16),
    ("ShardedAdamW (standalone)", torch.bfloat16),
    ("ShardedAdamW (standalone, int8 state, master remainders)", torch.bfloat16),
]

# contender -> (estimate_peak row, its state options): the rows the peak model covers
PEAK_ESTIMATES: dict[str, tuple[str, dict]] = {
    "DDP + AdamW": ("ddp", {}),
    "ShardedAdamW (attach)": ("attached", {}),
    "ShardedAdamW (attach, bucket view)": ("attached", {}),
    "ShardedAdamW (standalone)": ("standalone", {}),
    "ShardedAdamW (standalone, bf16 state)": ("standalone", BF16_STATE),
    "ShardedAdamW (standalone, int8 state)": ("standalone", INT8),
    "ShardedAdamW (attach, int8 state)": ("attached", INT8),
    "ShardedAdamW (standalone, int8 state, master remainders)": ("standalone", REMAINDERS_INT8),
}


class Peak(float):
    """A measured peak in bytes per parameter that prints the estimate beside itself, with
    the estimate's error relative to it (``4.1 (estimate 4.5, +8%)``), so that the table
    ``report.peak_markdown`` renders shows both; arithmetic on it is plain ``float``
    arithmetic."""

    estimate: float | None

    def __new__(cls, value: float, estimate: float | None = None) -> Peak:
        peak = super().__new__(cls, value)
        peak.estimate = estimate
        return peak

    def __format__(self, spec: str) -> str:
        text = float.__format__(float(self), spec)
        if self.estimate is None:
            return text
        error = (self.estimate - self) / self if self else 0.0
        return f"{text} (estimate {float.__format__(self.estimate, spec)}, {error:+.0%})"


def peak_estimate(
    name: str, dtype: torch.dtype, base: nn.Module, world_size: int, backend: str
) -> float | None:
    """What ``estimate_peak`` predicts for contender ``name`` training ``base`` cast to
    ``dtype``, in bytes per parameter (its param groups as every contender builds them), or
    ``None`` where it has no model of the setup (ZeroRedundancyOptimizer, DeepSpeed,
    ``full_grads``)."""
    if name not in PEAK_ESTIMATES:
        return None
    setup, options = PEAK_ESTIMATES[name]
    tensors = model_tensors(weight_decay_groups(base), DTYPE_NAMES[dtype])
    est = estimate_peak(
        tensors,
        world_size,
        backend=backend,
        state_dtype=DTYPE_NAMES[options.get("state_dtype", torch.float32)],
        master_remainders=options.get("master_remainders", False),
    )
    return est[setup].per_param


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
        trainer = PEAK_CONTENDERS[name](model, device)
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
    each contender alone, on ``mlp(width, layers)`` with ``steps`` batches of ``batch`` rows;
    a measured row that the peak model covers is a ``Peak`` carrying its estimate."""
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
    world, backend = dist.get_world_size(), dist.get_backend()
    rows: list[tuple[str, str, float | str]] = []
    for name, dtype in PEAK_ROWS:
        value = measure_peak(name, dtype, base, batches, device)
        if isinstance(value, float):
            value = Peak(value, peak_estimate(name, dtype, base, world, backend))
        rows.append((name, str(dtype).removeprefix("torch."), value))
    return rows
