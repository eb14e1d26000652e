"""Side-by-side benchmark: DDP + torch AdamW against ShardedAdamW, same model, data and ranks.

Run under torchrun (``torchrun --standalone --nproc_per_node 2 -m sharded_adamw.bench``) or as
``sharded-adamw bench``. Every contender trains the same GPT-style model from the same weights
on the same batches, one after the other in the same process group; the table reports the
median step time (forward, backward and optimizer step) over the measured steps, its spread,
per-rank bytes of parameters, gradients and optimizer state, bytes communicated per step and
the final loss, each with its ratio to DDP.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .optimizer import ShardedAdamW


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small decoder-only transformer with a tied head."""

    def __init__(self, vocab: int, d: int, layers: int, seq: int, heads: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Result:
    name: str
    times: list[float] = field(default_factory=list)
    param_bytes: int = 0
    grad_bytes: int = 0
    state_bytes: int = 0
    comm_bytes: int = 0
    comm_note: str = "counted"
    peak_bytes: int | None = None
    loss: float = float("nan")
    skipped: str | None = None


@dataclass
class Setup:
    """What a contender needs: a fresh copy of the model, the data and the process group."""

    model: nn.Module
    device: torch.device
    world: int
    lr: float = 3e-4


def _groups(model: nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]


def ddp_adamw(s: Setup):
    net = DDP(s.model)
    opt = torch.optim.AdamW(_groups(s.model), lr=s.lr, foreach=True)
    P = sum(p.numel() * p.element_size() for p in s.model.parameters())
    return net, opt, lambda: 2 * P, "computed: all-reduce = reduce-scatter + all-gather"


def sharded_attached(s: Setup):
    net = DDP(s.model)
    opt = ShardedAdamW(_groups(s.model), lr=s.lr, foreach=True)
    opt.attach(net)
    return net, opt, lambda: _ours_bytes(opt), "counted"


def sharded_standalone(s: Setup):
    opt = ShardedAdamW(_groups(s.model), lr=s.lr, foreach=True)
    return s.model, opt, lambda: _ours_bytes(opt), "counted"


def _ours_bytes(opt: ShardedAdamW) -> int:
    st = opt.comm_stats()
    return st["reduce_scatter_bytes"] + st["all_gather_bytes"] + st["all_reduce_bytes"]


CONTENDERS: dict[str, Callable] = {
    "DDP + AdamW": ddp_adamw,
    "ShardedAdamW (attach)": sharded_attached,
    "ShardedAdamW (standalone)": sharded_standalone,
}


def _state_bytes(opt) -> int:
    if isinstance(opt, ShardedAdamW):
        return opt.memory()["state_allocated_bytes"]
    return nbytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _grad_bytes(model: nn.Module, opt) -> int:
    held = nbytes(p.grad for p in model.parameters())
    if isinstance(opt, ShardedAdamW):
        held += opt.memory()["grad_shard_bytes"]
    return held


class Runner:
    """One contender: its model copy, wrapped model and optimizer, and its measurements."""

    def __init__(self, name: str, make: Callable, base: nn.Module, device: torch.device):
        self.res = Result(name)
        self.model = copy.deepcopy(base).to(device)
        self.device = device
        world = dist.get_world_size() if dist.is_initialized() else 1
        try:
            self.net, self.opt, self.comm, self.res.comm_note = make(
                Setup(self.model, device, world)
            )
        except ImportError as e:
            self.res.skipped = f"not installed ({e.name})"

    def step(self, x: torch.Tensor, y: torch.Tensor, measure: bool, last: bool) -> None:
        if self.res.skipped:
            return
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(self.net(x).flatten(0, 1), y.flatten())
        loss.backward()
        if last:
            self.res.grad_bytes = _grad_bytes(self.model, self.opt)
        self.opt.step()
        self.opt.zero_grad()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if measure:
            self.res.times.append(time.perf_counter() - t0)
        if last:
            self.res.loss = loss.item()
            self.res.param_bytes = nbytes(self.model.parameters())
            self.res.state_bytes = _state_bytes(self.opt)
            self.res.comm_bytes = self.comm()


def run_all(base: nn.Module, batches: list, warmup: int, device: torch.device) -> list[Result]:
    """Train every contender, interleaved step by step so that machine noise hits all alike.

    Peak CUDA memory needs contenders one at a time, so on a GPU each runs alone."""
    if device.type == "cuda":
        results = []
        for name, make in CONTENDERS.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            r = Runner(name, make, base, device)
            for i, (x, y) in enumerate(batches):
                r.step(x, y, i >= warmup, i == len(batches) - 1)
            r.res.peak_bytes = torch.cuda.max_memory_allocated(device)
            results.append(r.res)
            del r
        return results
    runners = [Runner(name, make, base, device) for name, make in CONTENDERS.items()]
    for i, (x, y) in enumerate(batches):
        for r in runners:
            r.step(x, y, i >= warmup, i == len(batches) - 1)
    return [r.res for r in runners]


def table(results: list[Result]) -> str:
    """Markdown table with each quantity's ratio to the first (DDP) row."""
    base = results[0]
    peak = any(r.peak_bytes for r in results)

    def cell(value: float, ref: float, fmt: str = ".2f") -> str:
        return f"{value:{fmt}} ({value / ref:.2f}x)" if ref else f"{value:{fmt}}"

    mib = 2**20
    head = "| optimizer | step ms (median) | p10-p90 ms | params MiB | grads MiB | state MiB |"
    head += " comm MiB/step |" + (" peak MiB |" if peak else "") + " final loss |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base_ms = statistics.median(base.times) * 1e3 if base.times else 0.0
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped: {r.skipped} |")
            continue
        ms = statistics.median(r.times) * 1e3
        qs = statistics.quantiles(r.times, n=10) if len(r.times) > 1 else r.times * 9
        row = [
            r.name,
            cell(ms, base_ms, ".1f"),
            f"{qs[0] * 1e3:.1f}-{qs[-1] * 1e3:.1f}",
            f"{r.param_bytes / mib:.2f}",
            cell(r.grad_bytes / mib, base.grad_bytes / mib),
            cell(r.state_bytes / mib, base.state_bytes / mib),
            cell(r.comm_bytes / mib, base.comm_bytes / mib),
        ]
        if peak:
            row.append(cell((r.peak_bytes or 0) / mib, (base.peak_bytes or 0) / mib))
        row.append(f"{r.loss:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sharded-adamw bench",
        description="Train the same GPT-style model with DDP + AdamW and ShardedAdamW, side "
        "by side, and print step time, memory and communication with ratios to DDP. Run it "
        "under torchrun to use several ranks.",
    )
    p.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sample (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per rank (default 8)")
    p.add_argument("--steps", type=int, default=30, help="measured steps (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured first steps (default 5)")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.vocab, args.seq_len = 32, 1, 128, 16
        args.steps, args.warmup = 3, 1
    for name in ("d_model", "layers", "vocab", "seq_len", "batch_size", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.manual_seed(0)
    base = GPT(args.vocab, args.d_model, args.layers, args.seq_len)
    g = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(args.warmup + args.steps):
        x = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), generator=g)
        batches.append((x[:, :-1].to(device), x[:, 1:].to(device)))
    results = run_all(base, batches, args.warmup, device)
    if rank == 0:
        P = sum(p.numel() for p in base.parameters())
        print(
            f"\n{P / 1e6:.2f}M parameters, world size {world}, {device.type}, "
            f"torch {torch.__version__}, {args.steps} measured steps after {args.warmup} warm-up\n"
        )
        print(table(results))
    return results


if __name__ == "__main__":
    main()
