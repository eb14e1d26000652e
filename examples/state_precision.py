"""What low-precision optimizer state costs in accuracy: ShardedAdamW with ``state_dtype`` fp32,
bf16 and int8 on two models, from the same weights on the same batches.

    python examples/state_precision.py            # about 2-4 minutes on 2 CPU cores
    python examples/state_precision.py --quick    # a few steps of tiny models (the test)
    torchrun --standalone --nproc_per_node 2 examples/state_precision.py   # also works

``state_dtype`` chooses how AdamW's two moments, ``exp_avg`` and ``exp_avg_sq``, are stored:
``torch.float32`` (the default: exactly ``torch.optim.AdamW``, 8 bytes per parameter),
``torch.bfloat16`` (4 bytes) or ``torch.int8`` (blockwise 8-bit with a dynamic map, as in
8-bit Adam: about 2 bytes; parameters under 4096 elements keep fp32 state). The update itself
always runs in fp32. Two models are trained three times each, one copy per state dtype:

- the demo's character-level GPT (``examples/train_gpt.py``: same model, corpus, parameter
  groups, betas and warmup + cosine schedule);
- an MLP classifier that learns the labels a fixed random teacher network gives to Gaussian
  inputs (a synthetic but learnable task, generated from the seed).

The three copies of a model start from the same weights and see the same batches in the same
order, so the only difference between them is the storage of the optimizer state. At the end
rank 0 prints a table (final loss, the mean of the last 10% of steps, per state dtype, with its
gap to fp32 and the state's bytes per parameter) and writes one PNG: the smoothed loss curves,
one panel per model, and below each the smoothed difference from the fp32 curve.

The models are small: on a CPU shared with other work, ``OMP_NUM_THREADS=1`` runs them several
times faster than torch's default threads (torchrun sets it by itself).

Under torchrun each rank reads its own slice of every batch and the optimizer shards the state
(standalone mode, ZeRO-2); the int8 blocks do not depend on the world size.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# the demo's model, data and schedule, read from this directory (examples/ is not a package)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_gpt import (  # noqa: E402
    CORPUS,
    GPT,
    HEADS,
    WEIGHT_DECAY,
    CharWindows,
    batches,
    param_groups,
    warmup_cosine,
)

from sharded_adamw import ShardedAdamW  # noqa: E402
from sharded_adamw.core.state_formats import MIN_QUANTIZED_NUMEL  # noqa: E402

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
BETAS = (0.9, 0.95)  # the demo's
log = logging.getLogger("state_precision")


# ---- the second model: an MLP that learns a teacher's labels ---------------------------------


class Teacher(nn.Module):
    """A fixed random network whose argmax over ``classes`` outputs labels Gaussian inputs."""

    def __init__(self, dim: int, hidden: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.out = nn.Linear(hidden, classes)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x) * 3.0).argmax(1)


def mlp(dim: int, width: int, depth: int, classes: int) -> nn.Module:
    """The student: ``depth`` hidden layers of ``width`` with GELU, then a linear classifier."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(dim if i == 0 else width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def teacher_batches(
    dim: int, classes: int, samples: int, batch_size: int, rank: int, world: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of a fixed set of ``samples`` Gaussian inputs labelled by a teacher, all
    made from ``seed``: a fresh shuffle every epoch; each rank takes every ``world``-th row of
    each global batch of ``batch_size * world`` rows."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        teacher = Teacher(dim, 128, classes)
    x = torch.randn(samples, dim, generator=g)
    y = teacher(x)
    step = batch_size * world
    while True:
        order = torch.randperm(samples, generator=g)
        for lo in range(0, samples - step + 1, step):
            idx = order[lo : lo + step][rank::world]
            yield x[idx], y[idx]


# ---- training ----------------------------------------------------------------------------------


@dataclass
class Task:
    """A model to train from ``make`` (called under the seed), its batches and loss."""

    name: str
    make: Callable[[], nn.Module]
    data: Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # (rank, world)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    steps: int
    lr: float
    losses: dict[str, list[float]] = field(default_factory=dict)
    state_bytes_per_param: dict[str, float] = field(default_factory=dict)
    params: int = 0


def check_int8(opt: ShardedAdamW, model: nn.Module, task: str) -> str:
    """Make sure int8 state is exercised: every parameter of at least ``MIN_QUANTIZED_NUMEL``
    (4096) elements must keep
    8-bit codes (``exp_avg_codes``), the smaller ones fp32. Returns a one-line summary."""
    params = list(dict.fromkeys(model.parameters()))  # the tied head once
    coded = [p for p in params if "exp_avg_codes" in opt.state[p]]
    big = [p for p in params if p.numel() >= MIN_QUANTIZED_NUMEL]
    if not coded or set(coded) != set(big):
        raise RuntimeError(
            f"{task}: int8 state on {len(coded)} of the {len(big)} parameters of >= "
            f"{MIN_QUANTIZED_NUMEL} elements; expected all of them"
        )
    share = sum(p.numel() for p in coded) / sum(p.numel() for p in params)
    return f"{task}: int8 codes for {len(coded)} of {len(params)} tensors ({share:.1%} of elements)"


def train(task: Task, rank: int, world: int, device: torch.device, seed: int) -> None:
    """Train one copy of ``task``'s model per state dtype, side by side: the same initial
    weights, the same batch for all three at every step. Fills ``task.losses`` (mean over
    ranks) and ``task.state_bytes_per_param``."""
    torch.manual_seed(seed)
    base = task.make().to(device)
    task.params = sum(p.numel() for p in dict.fromkeys(base.parameters()))
    copies, opts, scheds = {}, {}, {}
    for name, dtype in STATE_DTYPES.items():
        model = copy.deepcopy(base)
        opt = ShardedAdamW(
            param_groups(model, WEIGHT_DECAY),
            lr=task.lr,
            betas=BETAS,
            weight_decay=WEIGHT_DECAY,
            state_dtype=dtype,
        )
        warmup = max(1, task.steps // 10)
        copies[name], opts[name] = model, opt
        scheds[name] = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(task.steps, warmup))
    task.losses = {name: [] for name in STATE_DTYPES}
    stream = task.data(rank, world)
    bar = tqdm(range(task.steps), desc=task.name, unit="step", disable=rank != 0)
    for _ in bar:
        x, y = (t.to(device) for t in next(stream))
        step_losses = []
        for name, model in copies.items():
            loss = task.loss(model(x), y)
            loss.backward()
            opts[name].step()
            scheds[name].step()
            opts[name].zero_grad(set_to_none=True)
            step_losses.append(loss.detach())
        stacked = torch.stack(step_losses)
        if world > 1:
            dist.all_reduce(stacked)
        for name, value in zip(task.losses, (stacked / world).tolist()):
            task.losses[name].append(value)
        bar.set_postfix(
            {"loss fp32/bf16/int8": "/".join(f"{v[-1]:.4f}" for v in task.losses.values())}
        )
    bar.close()
    log.info(check_int8(opts["int8"], copies["int8"], task.name))
    for name, opt in opts.items():
        state = torch.tensor(float(opt.memory()["state_bytes"]), device=device)
        if world > 1:
            dist.all_reduce(state)
        task.state_bytes_per_param[name] = state.item() / task.params
    del copies, opts, scheds
    gc.collect()


# ---- report ------------------------------------------------------------------------------------


def final_loss(values: list[float]) -> float:
    """The mean of the last 10% of the steps (at least one)."""
    tail = values[-max(1, len(values) // 10) :]
    return sum(tail) / len(tail)


def table(tasks: list[Task]) -> str:
    """One row per model and state dtype: final loss, its gap to fp32 (absolute and relative)
    and the optimizer state's bytes per parameter (all ranks together)."""
    width = max(len(t.name) for t in tasks) + 2
    head = ("state", "final loss", "gap to fp32", "gap %", "state B/param")
    lines = [
        "final loss = mean training loss over the last 10% of steps",
        f"{'model':<{width}}{head[0]:<7}" + "".join(f"{h:>15}" for h in head[1:]),
    ]
    for t in tasks:
        ref = final_loss(t.losses["fp32"])
        for name, values in t.losses.items():
            loss = final_loss(values)
            gap, pct = (
                ("-", "-")
                if name == "fp32"
                else (
                    f"{loss - ref:+.5f}",
                    f"{100 * (loss - ref) / ref:+.3f}%",
                )
            )
            lines.append(
                f"{t.name:<{width}}{name:<7}{loss:>15.4f}{gap:>15}{pct:>15}"
                f"{t.state_bytes_per_param[name]:>15.2f}"
            )
    return "\n".join(lines)


def smooth(values: list[float], window: int) -> torch.Tensor:
    """Trailing moving average over ``window`` steps (fewer at the start)."""
    v = torch.tensor(values, dtype=torch.float64)
    c = torch.cat([torch.zeros(1, dtype=torch.float64), v.cumsum(0)])
    hi = torch.arange(1, len(v) + 1)
    lo = (hi - window).clamp_min(0)
    return (c[hi] - c[lo]) / (hi - lo)


def plot(tasks: list[Task], path: Path, world: int) -> None:
    """The smoothed loss curves, one panel per model, and below each the smoothed difference
    of the bf16 and int8 curves from the fp32 one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(
        2,
        len(tasks),
        figsize=(6 * len(tasks), 6),
        sharex="col",
        gridspec_kw={"height_ratios": [3, 1.3]},
        squeeze=False,
    )
    styles = {"fp32": ("-", 2.6), "bf16": ("--", 1.8), "int8": (":", 1.8)}
    for col, t in enumerate(tasks):
        top, bottom = axes[0, col], axes[1, col]
        window = max(1, t.steps // 40)
        steps = range(1, t.steps + 1)
        ref = smooth(t.losses["fp32"], window)
        for name, values in t.losses.items():
            style, width = styles[name]
            curve = smooth(values, window)
            label = f"{name} ({final_loss(values):.4f})"
            top.plot(steps, curve, style, linewidth=width, label=label)
            bottom.plot(steps, curve - ref, style, linewidth=width, label=name)
        top.set_title(f"{t.name}, {t.params / 1e6:.2f}M parameters")
        top.set_ylabel(f"training loss (moving average, {window} steps)")
        top.set_yscale("log")
        top.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        top.yaxis.set_minor_formatter(  # 2, 3, 4, 5 times a power of ten, not 6 to 9
            FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "2345" else "")
        )
        top.legend(title="state dtype (final loss)")
        bottom.axhline(0.0, color="gray", linewidth=0.8)
        bottom.set_ylabel("minus fp32")
        bottom.set_xlabel("step")
    ranks = f"{world} rank{'s' if world > 1 else ''}"
    fig.suptitle(f"ShardedAdamW state_dtype: same weights, same batches ({ranks})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--quick", action="store_true", help="a few steps of tiny models (for the tests)"
    )
    p.add_argument("--gpt-steps", type=int, help="GPT steps (default 500; --quick 6)")
    p.add_argument("--mlp-steps", type=int, help="MLP steps (default 1500; --quick 6)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/state_precision.png"),
        help="PNG of the loss curves (default runs/state_precision.png)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    args = p.parse_args(argv)
    args.gpt_steps = args.gpt_steps or (6 if args.quick else 500)
    args.mlp_steps = args.mlp_steps or (6 if args.quick else 1500)
    for name in ("gpt_steps", "mlp_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def tasks(args: argparse.Namespace) -> list[Task]:
    """The two models at the default size, or tiny ones with ``--quick`` (still with
    parameters of at least 4096 elements, so that int8 state is exercised)."""
    seq_len, d_model, layers, gpt_batch = (32, 32, 1, 4) if args.quick else (64, 128, 3, 16)
    dim, width, depth, classes, samples, mlp_batch = (
        (32, 64, 2, 10, 512, 32) if args.quick else (64, 256, 3, 10, 20_000, 128)
    )
    text = CharWindows(CORPUS.read_text(), seq_len)
    return [
        Task(
            name="char-level GPT",
            make=lambda: GPT(len(text.vocab), seq_len, d_model, layers, HEADS),
            data=lambda rank, world: batches(text, gpt_batch, rank, world, args.seed),
            loss=lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()),
            steps=args.gpt_steps,
            lr=2e-3,
        ),
        Task(
            name="MLP on teacher labels",
            make=lambda: mlp(dim, width, depth, classes),
            data=lambda rank, world: teacher_batches(
                dim, classes, samples, mlp_batch, rank, world, args.seed
            ),
            loss=F.cross_entropy,
            steps=args.mlp_steps,
            lr=1e-3,
        ),
    ]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group if started by it (nccl on CUDA, else gloo); a plain
    process runs without one (ShardedAdamW at world size 1). Returns rank, world, device."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    todo = tasks(args)
    for task in todo:
        train(task, rank, world, device, args.seed)
    if rank == 0:
        print(table(todo))
        plot(todo, args.out, world)
        print(f"loss curves: {args.out}")
        print(f"time: {time.perf_counter() - start:.0f} s ({world} process{'es' * (world > 1)})")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
