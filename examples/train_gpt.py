"""Train a small character-level GPT three times, side by side: ShardedAdamW attached to DDP,
ShardedAdamW standalone, and DDP + AdamW.

    torchrun --standalone --nproc_per_node 2 examples/train_gpt.py   # two ranks (gloo on CPU)
    python examples/train_gpt.py                                     # one process

The three copies start from the same weights, see the same batches on each rank (each rank
reads its own slice of the corpus, as with ``DistributedSampler``) and follow the same
parameter groups and warmup + cosine schedule. They are optimized by

- ``ShardedAdamW`` attached to DDP (ZeRO-1): DDP's all-reduce becomes a reduce-scatter into
  per-rank gradient shards, the optimizer state is sharded, DDP's bucket buffers stay;
- ``ShardedAdamW`` standalone on the plain module (ZeRO-2): the optimizer's own hooks
  reduce-scatter during backward and free ``p.grad``, so gradients are sharded too;
- ``torch.optim.AdamW`` on a DDP model, the reference.

At the end rank 0 prints every rank's memory for the three and what each ShardedAdamW mode
saves, each mode's largest difference from the reference's parameters, and writes a loss-curve
PNG. During training, rank 0's progress bar shows the three losses (mean over ranks) and the
tokens per second of both ShardedAdamW runs (all ranks together).

All optimizers use the same implementation family (torch's default: the for-loop on CPU,
foreach on CUDA), so the comparison is exact: on gloo both ShardedAdamW models are designed to
stay bitwise equal to the reference. There is no gradient clipping for the same reason: a norm
summed over shards and one summed over whole parameters add the same numbers in another order.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from sharded_adamw import ShardedAdamW

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
HEADS = 4
MIB = 2**20
MODES = {"attached": "ZeRO-1", "standalone": "ZeRO-2"}  # ShardedAdamW's modes, their ZeRO stage
REFERENCE = "DDP + AdamW"
WEIGHT_DECAY = 0.1
log = logging.getLogger("train_gpt")


# ---- data -----------------------------------------------------------------------------------


class CharWindows(Dataset):
    """Every window of ``seq_len + 1`` characters of a text: input is the first ``seq_len``,
    target the same window shifted by one."""

    def __init__(self, text: str, seq_len: int):
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        self.ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.seq_len = seq_len
        if len(self) < 1:
            raise ValueError(f"corpus of {len(text)} characters is shorter than --seq-len + 1")

    def __len__(self) -> int:
        return len(self.ids) - self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.ids[i : i + self.seq_len + 1]
        return window[:-1], window[1:]


def batches(
    data: CharWindows, batch_size: int, rank: int, world: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of this rank's slice: a fresh shuffle of all windows every epoch, dealt
    out across ranks by ``DistributedSampler`` so that no two ranks see the same window."""
    sampler = DistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"--batch-size {batch_size} is larger than a rank's share of windows")
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# ---- model ----------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and earlier ones."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention, then a 4x MLP, each on a residual path."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final LayerNorm and an LM head that
    shares its weight with the token embedding."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, layers: int, heads: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok_emb.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices of linear layers; none on biases, LayerNorms and the
    embeddings (the tied head included)."""
    embeddings = {m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 and p not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(steps: int, warmup: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine down to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---- the three runs -------------------------------------------------------------------------


def nbytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by ``tensors`` (``None`` entries, such as missing gradients, count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Run:
    """One copy of the model with its optimizer and schedule, and what it measured.

    ``mode`` is a key of ``MODES`` for ShardedAdamW (``"attached"``: on a DDP model;
    ``"standalone"``: on the plain module, no DDP), or None for the reference, DDP +
    ``torch.optim.AdamW``."""

    def __init__(
        self,
        mode: str | None,
        model: nn.Module,
        device: torch.device,
        args: argparse.Namespace,
    ):
        self.mode, self.model = mode, model
        self.name = f"ShardedAdamW {mode}" if mode else REFERENCE
        self.ddp = (
            None
            if mode == "standalone"
            else DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        )
        groups = param_groups(model, WEIGHT_DECAY)
        hyper = dict(lr=args.lr, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
        if mode:
            self.opt = ShardedAdamW(groups, **hyper, process_group=shard_mesh(args, device))
            if self.ddp is not None:
                self.opt.attach(self.ddp)
        else:
            self.opt = torch.optim.AdamW(groups, **hyper)
        warmup = max(1, args.steps // 10)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(args.steps, warmup))
        self.p_grad_bytes = 0
        self.seconds = 0.0

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, backward, optimizer and scheduler step; returns the detached local loss."""
        t0 = time.perf_counter()
        logits = (self.ddp or self.model)(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        self.p_grad_bytes = nbytes(p.grad for p in self.model.parameters())
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.seconds = time.perf_counter() - t0
        return loss.detach()

    def memory(self) -> dict[str, int]:
        """This rank's bytes of parameters, gradients and optimizer state, counted from tensors.

        Gradients are all the gradient storage: ``p.grad`` as left before the step, DDP's
        bucket buffers (not visible from Python; they hold one gradient per trainable
        parameter, so they are counted as those bytes) and ShardedAdamW's averaged gradient
        shard."""
        grads = self.p_grad_bytes
        if self.ddp is not None:
            grads += nbytes(p for p in self.model.parameters() if p.requires_grad)
        if self.mode:
            m = self.opt.memory()
            grads += m["grad_shard_bytes"]
            state = m["state_bytes"]
        else:
            s = self.opt.state.values()
            state = nbytes(t for st in s for t in st.values() if torch.is_tensor(t))
        return {"params": nbytes(self.model.parameters()), "grads": grads, "state": state}


# ---- report ---------------------------------------------------------------------------------


def memory_table(per_rank: list[dict[str, dict[str, int]]]) -> str:
    """Each rank's MiB for every run, then a saving row (DDP + AdamW bytes / mode bytes) for each
    ShardedAdamW mode, so that the table shows what each mode saves."""
    cols = ("params", "grads", "state", "total")
    width = 36
    lines = [f"{'memory per rank (MiB)':<{width}}" + "".join(f"{c:>10}" for c in cols)]
    for rank, mem in enumerate(per_rank):
        mem = {name: {**m, "total": sum(m.values())} for name, m in mem.items()}
        for name, m in mem.items():
            cells = "".join(f"{m[c] / MIB:>10.3f}" for c in cols)
            lines.append(f"{f'rank {rank}  {name}':<{width}}{cells}")
        ref = mem[REFERENCE]
        for mode, stage in MODES.items():
            ours = mem[f"ShardedAdamW {mode}"]
            cells = "".join(f"{ref[c] / ours[c]:>9.2f}x" for c in cols)
            lines.append(f"{f'rank {rank}  saving {mode} ({stage})':<{width}}{cells}")
    lines += [
        "Bytes held, counted from tensors. grads, as held after backward: p.grad, DDP's bucket",
        "buffers (DDP + AdamW and attached; not visible from Python, counted as the bytes of the",
        "trainable parameters' gradients) and ShardedAdamW's averaged gradient shard.",
        "Attached (ZeRO-1) shards the optimizer state; standalone (ZeRO-2) shards the gradients",
        "too. Peak memory, measured by the system: MALLOC_MMAP_THRESHOLD_=131072 torchrun",
        '--standalone --nproc_per_node 4 examples/memory_table.py (README "Memory, measured").',
    ]
    return "\n".join(lines)


def plot_losses(losses: dict[str, list[float]], path: Path, world: int) -> None:
    """All loss curves on one chart, each in its own line style so that equal curves all show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = (("-", 3.0), ("--", 1.8), (":", 1.2))  # widest first, so later ones show on top
    for (name, values), (style, width) in zip(losses.items(), styles):
        ax.plot(range(1, len(values) + 1), values, style, linewidth=width, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over ranks)")
    ax.set_title(f"char-level GPT, {world} rank{'s' if world > 1 else ''}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank (default 16)")
    p.add_argument("--seq-len", type=int, default=64, help="characters per sequence (default 64)")
    p.add_argument("--d-model", type=int, default=128, help="model width (default 128)")
    p.add_argument("--layers", type=int, default=3, help="transformer blocks (default 3)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/loss_curve.png"),
        help="loss-curve PNG (default runs/loss_curve.png)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    p.add_argument(
        "--shard-size",
        type=int,
        default=0,
        help="hybrid sharding: shard the optimizer state over groups of this many ranks (e.g. "
        "the GPUs of one node) and replicate across groups; must divide the world size "
        "(default 0: shard over every rank)",
    )
    args = p.parse_args(argv)
    if args.shard_size < 0:
        p.error(f"--shard-size must be >= 0, got {args.shard_size}")
    for name in ("steps", "batch_size", "seq_len", "d_model", "layers"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.d_model % HEADS:
        p.error(f"--d-model must be a multiple of {HEADS} (the number of heads)")
    return args


def shard_mesh(args: argparse.Namespace, device: torch.device):
    """The ``("replicate", "shard")`` mesh for ``--shard-size``, or None for flat sharding."""
    if not args.shard_size:
        return None
    world = dist.get_world_size()
    if world % args.shard_size:
        raise SystemExit(f"--shard-size {args.shard_size} does not divide the world size {world}")
    return init_device_mesh(
        device.type,
        (world // args.shard_size, args.shard_size),
        mesh_dim_names=("replicate", "shard"),
    )


def init_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group (nccl on CUDA, else gloo), or make a one-process group
    when started without torchrun, so that DDP runs either way. Returns rank, world, device."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    data = CharWindows(CORPUS.read_text(), args.seq_len)
    torch.manual_seed(args.seed)
    base = GPT(len(data.vocab), args.seq_len, args.d_model, args.layers, HEADS).to(device)
    log.info(
        "%s: %d characters, vocab %d | GPT %.2fM parameters | world size %d, %s, %s",
        CORPUS.name,
        len(data.ids),
        len(data.vocab),
        sum(p.numel() for p in base.parameters()) / 1e6,
        world,
        dist.get_backend(),
        device,
    )
    runs = [Run(mode, copy.deepcopy(base), device, args) for mode in MODES]
    runs.append(Run(None, base, device, args))
    losses: dict[str, list[float]] = {r.name: [] for r in runs}
    tokens_per_step = world * args.batch_size * args.seq_len
    stream = batches(data, args.batch_size, rank, world, args.seed)
    bar = tqdm(range(args.steps), desc="train", unit="step", disable=rank != 0)
    for _ in bar:
        x, y = (t.to(device) for t in next(stream))
        step_losses = torch.stack([r.train_step(x, y) for r in runs])
        dist.all_reduce(step_losses)
        for name, value in zip(losses, (step_losses / world).tolist()):
            losses[name].append(value)
        bar.set_postfix(
            {
                "loss att/sa/ref": "/".join(f"{v[-1]:.4f}" for v in losses.values()),
                "tok/s att/sa": "/".join(
                    f"{tokens_per_step / r.seconds:,.0f}" for r in runs if r.mode
                ),
            }
        )
    bar.close()

    reference = runs[-1]
    diffs = {}
    with torch.no_grad():
        for r in runs[:-1]:
            pairs = list(zip(r.model.parameters(), reference.model.parameters()))
            diffs[r.name] = (
                max((p - q).abs().max().item() for p, q in pairs),
                all(torch.equal(p, q) for p, q in pairs),
            )
    mine = {
        "memory": {r.name: r.memory() for r in runs},
        "diffs": diffs,
        "comm": {r.name: r.opt.comm_stats() for r in runs if r.mode},
    }
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        final = ", ".join(f"{name} {values[-1]:.4f}" for name, values in losses.items())
        print(f"\nfinal loss (mean over ranks): {final}")
        print(memory_table([m["memory"] for m in every]))
        for name, comm in every[0]["comm"].items():
            print(
                f"communication per step (rank 0), {name}: reduce-scatter "
                f"{comm['reduce_scatter_bytes'] / MIB:.3f} MiB, all-gather "
                f"{comm['all_gather_bytes'] / MIB:.3f} MiB"
            )
        for r, m in enumerate(every):
            for name, (max_diff, equal) in m["diffs"].items():
                print(
                    f"rank {r}: max |{name} - AdamW| over parameters = {max_diff:.3g}, "
                    f"bitwise equal: {equal}"
                )
        plot_losses(losses, args.out, world)
        print(f"loss curve: {args.out}")
    # DDP and the optimizers hold the process group in reference cycles; a gloo group left to
    # the interpreter's teardown can abort the process at exit, so free them first.
    del runs, reference, pairs
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
