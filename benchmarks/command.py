"""The command line of ``python -m benchmarks`` / ``python -m benchmarks``: parse the
flags, join the process group, run the chosen mode and print its report on rank 0."""

from __future__ import annotations

import argparse
import os
import re

import torch
import torch.distributed as dist

from sharded_adamw.tools.peak import PeakMemory

from .bandwidth import update_bandwidth
from .contenders import CONTENDERS, LR
from .copies import copy_table
from .models import MANY_SMALL, MANY_SMALL_QUICK, SIZES, Size
from .peak_memory import peak_table
from .profile import PROFILE_NOTE, PROFILED, profile_all, profile_markdown
from .report import GLOO_NOTE, NOTES, copy_markdown, environment, peak_markdown, plot, table
from .run import Result, run_all


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Train the same GPT-style model with DDP + AdamW, ZeroRedundancyOptimizer, "
        "DeepSpeed ZeRO-1/2, FSDP2 and ShardedAdamW, side by side, and print step time, "
        "memory and communication with ratios to DDP, plus a bar chart. Run it under "
        "torchrun to use several ranks.",
    )
    p.add_argument(
        "--sizes",
        default="medium",
        help="comma-separated model presets, from "
        + ", ".join(f"{k} (d={s.d_model}, {s.layers} layers)" for k, s in SIZES.items())
        + " (default: %(default)s)",
    )
    p.add_argument(
        "--many-small",
        action="store_true",
        help=f"also run a model of {MANY_SMALL.tensors} parameters of {MANY_SMALL.d_model} "
        "elements (per-tensor overheads)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated contender names to run (default: all); DDP + AdamW always runs",
    )
    p.add_argument("--seq-len", type=_positive, default=64, help="tokens per sample (default 64)")
    p.add_argument("--batch-size", type=_positive, default=8, help="samples per rank (default 8)")
    p.add_argument("--steps", type=_positive, default=30, help="measured steps (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured first steps (default 5)")
    p.add_argument("--out", default="runs/bench.png", help="bar chart path (default: %(default)s)")
    p.add_argument(
        "--quick", action="store_true", help="tiny models and 3 steps (for tests and CI)"
    )
    p.add_argument(
        "--peak-memory",
        action="store_true",
        help="instead of the timed run, measure each contender's peak memory alone on a "
        "12 x Linear(2048, 2048) model (50.4M parameters) over 3 steps, fp32 and bf16 "
        "(on CPU, start with MALLOC_MMAP_THRESHOLD_=131072)",
    )
    p.add_argument(
        "--copy-bytes",
        action="store_true",
        help="instead of the timed run, count the bytes that copy, cat, scale and fill "
        "kernels move in one step of ShardedAdamW (standalone fp32, attached fp32, standalone "
        "bf16) per element of the local shard, beside AdamW's own 28",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the side-by-side run, profile --steps steps (after --warmup) of "
        f"{', '.join(PROFILED)} (or the --only ones) with torch.profiler and print, per "
        "contender, ms per step: wall, the bench.* and sharded_adamw.* ranges, and the self "
        "CPU time of copy-like aten ops",
    )
    p.add_argument(
        "--gpu-update-bandwidth",
        action="store_true",
        help="instead of the side-by-side run, time ShardedAdamW's local AdamW update at "
        "world size 1 (GPU if there is one, else CPU) and report GB/s at 28 bytes/element",
    )
    p.add_argument(
        "--numel",
        type=_positive,
        default=None,
        help="elements for --gpu-update-bandwidth (default 2**28 on GPU, 2**24 on CPU)",
    )
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="the device's memory bandwidth in GB/s, to report --gpu-update-bandwidth as a "
        "fraction of it (e.g. 3350 for an H100 SXM)",
    )
    args = p.parse_args(argv)
    args.size_names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.size_names if s not in SIZES]
    if unknown or not args.size_names:
        p.error(f"argument --sizes: unknown {unknown or args.sizes!r}; choose from {list(SIZES)}")
    args.contenders = list(CONTENDERS)
    if args.only:
        # commas inside parentheses belong to a name: "ShardedAdamW (attach, bucket view)"
        wanted = [s.strip() for s in re.split(r",(?![^()]*\))", args.only) if s.strip()]
        unknown = [w for w in wanted if w not in CONTENDERS]
        if unknown:
            p.error(f"argument --only: unknown {unknown}; choose from {list(CONTENDERS)}")
        args.contenders = [n for n in CONTENDERS if n == "DDP + AdamW" or n in wanted]
    args.profiled = args.contenders if args.only else list(PROFILED)
    if args.warmup < 0:
        p.error(f"argument --warmup: must be >= 0, got {args.warmup}")
    if args.peak_gbps is not None and not args.peak_gbps > 0:
        p.error(f"argument --peak-gbps: must be positive, got {args.peak_gbps}")
    if args.quick:
        args.size_names, args.seq_len, args.steps, args.warmup = ["tiny"], 16, 3, 1
        args.numel = args.numel or 2**20
    return args


def _init_distributed() -> torch.device:
    """Join torchrun's process group, or make a one-process group; this rank's device."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device or torch.device("cpu")


def _batches(size: Size, args: argparse.Namespace, device: torch.device) -> list:
    """Warm-up, measured and probe batches for this rank (seeded by rank, the same for every
    contender)."""
    g = torch.Generator().manual_seed(dist.get_rank())
    out = []
    for _ in range(args.warmup + args.steps + 1):
        x = torch.randint(0, size.vocab, (args.batch_size, args.seq_len + 1), generator=g)
        out.append((x[:, :-1].to(device), x[:, 1:].to(device)))
    return out


def _profile(sizes: dict[str, Size], args: argparse.Namespace, device: torch.device) -> None:
    """``--profile``: a table per size and contender, printed on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"\npython -m benchmarks --profile: world size {world}, {environment(device)}")
        batch = f"batch {args.batch_size} x {args.seq_len} tokens per rank"
        print(f"{args.steps} steps without and {args.steps} under the profiler, after "
              f"{args.warmup} warm-up, {batch}\n")  # fmt: skip
    for label, size in sizes.items():
        torch.manual_seed(0)
        base = size.build(args.seq_len)
        batches = _batches(size, args, device)
        for per_rank in profile_all(base, batches, args.warmup, args.steps, device, args.profiled):
            if rank == 0:
                print(f"### {label}: {per_rank[0].name}\n\n{profile_markdown(per_rank)}\n")
    if rank == 0:
        print(PROFILE_NOTE, flush=True)


def main(argv: list[str] | None = None) -> dict[str, list[Result]]:
    """Run the benchmark; returns the merged results per size (on every rank)."""
    args = parse_args(argv)
    if args.gpu_update_bandwidth:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("--gpu-update-bandwidth runs at world size 1: run it without torchrun")
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        numel = args.numel or (2**28 if device.type == "cuda" else 2**24)
        print(update_bandwidth(numel, device, 5 if args.quick else 20, args.peak_gbps))
        return {}
    device = _init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.peak_memory:
        width, layers = (256, 4) if args.quick else (2048, 12)
        rows = peak_table(width, layers, args.batch_size, 3, device)
        if rank == 0:
            print(f"\npython -m benchmarks --peak-memory: world size {world}, "
                  f"{environment(device)}\n")  # fmt: skip
            print(peak_markdown(rows, PeakMemory(device).method))
        return {}
    sizes = {name: SIZES[name] for name in args.size_names}
    if args.many_small:
        sizes["many-small"] = MANY_SMALL_QUICK if args.quick else MANY_SMALL
    if args.copy_bytes:
        if rank == 0:
            print(f"\npython -m benchmarks --copy-bytes: world size {world}, "
                  f"{environment(device)}\n")  # fmt: skip
        for label, size in sizes.items():
            torch.manual_seed(0)
            rows = copy_table(size.build(args.seq_len), _batches(size, args, device)[0][0])
            if rank == 0:
                print(f"### {label}\n\n{copy_markdown(rows, world)}\n", flush=True)
        return {}
    if args.profile:
        _profile(sizes, args, device)
        return {}
    if rank == 0:
        print(f"\npython -m benchmarks: world size {world}, {environment(device)}")
        print(f"{args.steps} measured steps after {args.warmup} warm-up, batch "
              f"{args.batch_size} x {args.seq_len} tokens per rank, lr {LR}\n")  # fmt: skip
    tables = {}
    for label, size in sizes.items():
        torch.manual_seed(0)
        base = size.build(args.seq_len)
        results = run_all(base, _batches(size, args, device), args.warmup, device, args.contenders)
        tables[label] = results
        if rank == 0:
            params = list(base.parameters())
            count = sum(p.numel() for p in params)
            print(f"### {label}: {count / 1e6:.2f}M parameters in {len(params)} tensors\n")
            print(table(results) + "\n", flush=True)
    if rank == 0:
        print(NOTES + (GLOO_NOTE if dist.get_backend() == "gloo" else ""))
        try:
            plot(tables, args.out)
            print(f"\nchart: {args.out}")
        except ImportError:
            print("\nmatplotlib is not installed: no chart written")
    return tables
