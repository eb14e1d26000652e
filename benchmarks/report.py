"""The report: markdown tables with ratios to DDP + AdamW, the notes on how each column is
counted, the bar chart, and the heading that names the machine and versions."""

from __future__ import annotations

import datetime
import os
import statistics

import torch
import torch.distributed as dist

from .copies import CopyBytes
from .run import Result


def peak_markdown(rows: list[tuple[str, str, float | str]], method: str) -> str:
    """The peak table as markdown, ratios to the first row, and how it was measured."""
    ref = rows[0][2] if isinstance(rows[0][2], float) else None
    lines = ["| setup | params | peak bytes / parameter |", "|---|---|---:|"]
    for name, dtype, value in rows:
        cell = ratio_cell(value, ref, ".1f") if isinstance(value, float) else f"skipped: {value}"
        lines.append(f"| {name} | {dtype} | {cell} |")
    return "\n".join(lines) + f"\n\nPeak above the bare model, largest rank; {method}."


def ratio_cell(value: float, ref: float | None, fmt: str = ".2f") -> str:
    """``value`` with its ratio to ``ref``, e.g. ``12.30 (0.50x)``; no ratio without a
    reference (zero, or the reference was skipped)."""
    return f"{value:{fmt}} ({value / ref:.2f}x)" if ref else f"{value:{fmt}}"


def spread(times: list[float]) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile of ``times`` in milliseconds."""
    ms = [t * 1e3 for t in times]
    if len(ms) < 2:
        return ms[0], ms[0], ms[0]
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    return statistics.median(ms), deciles[0], deciles[-1]


def paired_ratio(times: list[float], ref: list[float]) -> float:
    """Median over steps of each step's time divided by the reference's time on the same
    batch. Run back to back (interleaved on CPU), the pair sees the same machine load, so
    this cancels slow drifts that move both medians."""
    return statistics.median(t / r for t, r in zip(times, ref))


def table(results: list[Result]) -> str:
    """Markdown table, one row per contender, with each quantity's ratio to the first row
    (DDP + AdamW). Bytes are per rank (the largest rank's), comm is per step."""
    base = results[0] if not results[0].skipped else None
    peak = any(r.peak_bytes for r in results)
    mib = 2**20
    head = [
        "optimizer",
        "step ms (median)",
        "p10-p90 ms",
        "paired ratio",
        "params MiB",
        "grads MiB",
        "state MiB",
        "buffers MiB",
        "comm MiB/step (calls)",
    ]
    head += ["peak MiB"] if peak else []
    head += ["final loss", "weight decay by group"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = lambda attr, scale=mib: getattr(base, attr) / scale if base else None  # noqa: E731
    base_ms = spread(base.times)[0] if base else None
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped: {r.skipped} |" + " |" * (len(head) - 2))
            continue
        ms, p10, p90 = spread(r.times)
        row = [
            r.name,
            ratio_cell(ms, base_ms, ".1f"),
            f"{p10:.1f}-{p90:.1f}",
            f"{paired_ratio(r.times, base.times):.2f}x" if base else "",
            ratio_cell(r.param_bytes / mib, ref("param_bytes")),
            ratio_cell(r.grad_bytes / mib, ref("grad_bytes")),
            ratio_cell(r.state_bytes / mib, ref("state_bytes")),
            f"{r.buffer_bytes / mib:.2f}",
            ratio_cell(r.comm_bytes / mib, ref("comm_bytes")) + f" ({r.comm_calls})",
        ]
        if peak:
            row.append(ratio_cell((r.peak_bytes or 0) / mib, ref("peak_bytes")))
        row += [f"{r.loss:.4f}", r.weight_decays]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


NOTES = """\
- Step: forward, backward, optimizer step and zero_grad, timed per rank after a barrier; a \
step's time is the slowest rank's. Bytes are the largest rank's. Paired ratio: the median over \
steps of a step's time over DDP's on the same batch (run back to back on CPU).
- Held bytes are counted from tensors in an unmeasured probe step after the measured ones, \
each storage once: params and grads after backward, state (moments, step counts, fp32 master \
copies) and buffers after the step. DDP's own gradient buckets live in its C++ reducer and \
are not counted (one more gradient-sized buffer in every DDP-based row). FSDP2's params are \
its shards at rest; it gathers the full parameters for forward and backward. Buffers that \
live only inside a step (DeepSpeed's reduce bucket, FSDP2's gathered parameters, \
reduce-scatter inputs) are not counted; on a GPU the peak column includes them.
- comm is counted, not computed: every c10d collective dispatched during the probe step \
(DDP's C++ reducer included), a reduce-scatter counted by its input, an all-gather by its \
output, an all-reduce twice, a broadcast once; (calls) is the number of collectives.
- Every optimizer gets the same two groups (weight decay 0.1 on matrices, 0 on vectors); the \
last column shows the groups the updating optimizer holds."""
GLOO_NOTE = """
- On gloo, torch runs a reduce-scatter as an all-reduce of a clone of its input, then keeps \
this rank's chunk (ProcessGroupGloo.cpp): it moves twice the bytes counted here, and a \
reduce-scatter + all-gather optimizer sends 1.5x what DDP sends, not 1x."""


def plot(tables: dict[str, list[Result]], path: str) -> None:
    """Bar chart of step time and optimizer-state bytes per contender, as ratios to DDP +
    AdamW, one bar per size; a skipped contender gets the word instead of a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in next(iter(tables.values()))]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(names)), 8), sharex=True)
    width = 0.8 / len(tables)
    for k, (label, results) in enumerate(tables.items()):
        base = results[0]
        if base.skipped:
            continue
        base_ms = spread(base.times)[0]
        xs, ms, state = [], [], []
        for i, r in enumerate(results):
            x = i - 0.4 + width * (k + 0.5)
            if r.skipped:
                for ax in axes:
                    ax.text(x, 0, " skipped", rotation=90, ha="center", va="bottom", fontsize=7)
            else:
                xs.append(x)
                ms.append(spread(r.times)[0] / base_ms)
                state.append(r.state_bytes / base.state_bytes if base.state_bytes else 0)
        axes[0].bar(xs, ms, width, label=label)
        axes[1].bar(xs, state, width, label=label)
    for ax, what in zip(axes, ("median step time", "optimizer state bytes per rank")):
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylabel(f"{what}\n(ratio to DDP + AdamW)")
        ax.legend(fontsize="small")
    axes[1].set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize="small")
    world = dist.get_world_size() if dist.is_initialized() else 1
    fig.suptitle(f"python -m benchmarks, world size {world}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def environment(device: torch.device) -> str:
    """Date, machine and versions, for the heading of a run."""
    versions = [f"torch {torch.__version__}"]
    try:
        import deepspeed

        versions.append(f"deepspeed {deepspeed.__version__}")
    except ImportError:
        versions.append("deepspeed not installed")
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        cpu = "unknown CPU"
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), cpu)
        machine = f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads per rank"
    today = datetime.date.today().isoformat()
    return f"{today}, {machine}, {dist.get_backend()}, " + ", ".join(versions)


def copy_markdown(rows: list[CopyBytes], world: int) -> str:
    """The copy-byte table: extra bytes per shard element per step beside AdamW's own, with
    the ops that move them, under issue 14's target for fp32 standalone (``8W + 8``)."""
    lines = [
        f"Target for fp32 standalone: extra <= 8W + 8 = {8 * world + 8} B/element "
        f"(the design before issue 14, estimated on a GPU: 24W + 16 = {24 * world + 16}).",
        "",
        "| setup | shard elements | AdamW's own B/element | extra B/element | "
        "extra by op (B/element) |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ops = ", ".join(
            f"{op} {r.per_element(n):.1f}"
            for op, n in sorted(r.extra_by_op.items(), key=lambda kv: -abs(kv[1]))
            if abs(r.per_element(n)) >= 0.05
        )
        lines.append(
            f"| {r.label} | {r.shard_elements:,} | {r.per_element(r.adamw_bytes):.1f} | "
            f"{r.per_element(r.extra_bytes):.1f} | {ops} |"
        )
    return "\n".join(lines) + COPY_NOTE


COPY_NOTE = """

Per step and per element of the local shard (the elements the AdamW update touches), the rank \
with the most. Extra: bytes read plus bytes written by the data-movement kernels of the step \
(``benchmarks.counters.DATA_MOVEMENT_OPS``), those of the bare model's forward and \
backward subtracted; ops under 0.05 B/element are counted but not listed. AdamW's own: its \
reads of param, grad and both moments and its writes of three. Kernels that a backend runs on \
its own threads (inside gloo) are not seen."""
