"""``--gpu-update-bandwidth``: the memory bandwidth ShardedAdamW's local AdamW update achieves at
world size 1, where no communication happens."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from sharded_adamw.core.optimizer import ShardedAdamW
from sharded_adamw.core.update import adamw_update

from .counters import ADAMW_BYTES_PER_ELEMENT


def _timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def update_bandwidth(
    numel: int, device: torch.device, repeats: int, peak_gbps: float | None
) -> str:
    """Time ShardedAdamW's local update on ``numel`` fp32 elements at world size 1, where no
    communication happens, and report the bandwidth it achieves at 28 bytes per element.

    Two rows: ``adamw_update`` (update.py, the kernel ``ShardBucket.update`` runs) on one
    flat shard, and a whole ``opt.step()`` on one parameter of ``numel`` elements, which adds
    the copies into and out of the shard and its bucket. Both use torch's default
    implementation for the device (foreach on CUDA, the for-loop on CPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    flat = [torch.randn(numel, generator=g, device=device) for _ in range(2)]
    state = [torch.zeros(numel, device=device) for _ in range(2)]
    step = [torch.zeros((), dtype=torch.float32)]
    group = dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False,
        maximize=False, foreach=None, fused=None,
    )  # fmt: skip
    kernel = lambda: adamw_update([flat[0]], [flat[1]], [state[0]], [state[1]], [], step, group)

    param = nn.Parameter(torch.randn(numel, generator=g, device=device))
    grad = torch.randn(numel, generator=g, device=device)
    opt = ShardedAdamW([param], lr=1e-3)

    def full_step() -> None:
        param.grad = grad
        opt.step()
        opt.zero_grad()

    rows = []
    for what, fn in (("adamw_update on one flat shard", kernel), ("opt.step(), W=1", full_step)):
        seconds = _timed(fn, device, repeats)
        gbps = ADAMW_BYTES_PER_ELEMENT * numel / seconds / 1e9
        cells = [what, f"{numel:,}", f"{seconds * 1e3:.2f}", f"{gbps:.1f}"]
        if peak_gbps:
            cells.append(f"{100 * gbps / peak_gbps:.0f}%")
        rows.append("| " + " | ".join(cells) + " |")
    head = ["what", "elements", "median ms", "GB/s at 28 B/element"]
    head += [f"of {peak_gbps:g} GB/s peak"] if peak_gbps else []
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
    return "\n".join(
        [
            f"AdamW update bandwidth, fp32, {where}{threads}, torch {torch.__version__}, "
            f"median of {repeats}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *rows,
        ]
    )
