"""Small models and a deterministic training loop shared by the distributed tests."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW

VOCAB = 37  # sizes are primes or odd so that no tensor divides evenly by 2, 3 or 4


class TinyLM(nn.Module):
    """Embedding, linear, layernorm, a tied head, a frozen parameter and an optional branch
    that is skipped on some steps."""

    def __init__(self, dim: int = 13, hidden: int = 29):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.up = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, dim)
        self.branch = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.frozen_scale = nn.Parameter(torch.full((dim,), 0.5), requires_grad=False)

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.down(torch.relu(self.norm(self.up(h))))
        if use_branch:
            h = h + self.branch(h)
        return self.head(h * self.frozen_scale)


class Big(nn.Module):
    """About 2.7 million elements in tensors whose sizes divide by neither 2, 3 nor 4."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5003, 333)
        self.lin = nn.Linear(1001, 997)
        self.norm = nn.LayerNorm(997)


def param_groups(model: nn.Module, lr: float = 1e-2, weight_decay: float = 0.1) -> list[dict]:
    """Two groups with different lr and weight decay, like real training scripts."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": other, "lr": lr / 2, "weight_decay": 0.0},
    ]


def batch(step: int, rank: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, VOCAB, (n, 5), generator=g)
    return x, torch.roll(x, 1, dims=1)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * 0.97**s)


def compare(a: nn.Module, b: nn.Module) -> dict:
    """Per-parameter bitwise equality and max relative difference of ``b`` against ``a``."""
    out = {}
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        diff = (p.detach().double() - q.detach().double()).abs().max().item()
        scale = p.detach().double().abs().max().item() or 1.0
        out[name] = {"equal": torch.equal(p, q), "rel": diff / scale}
    return out


def train_pair(
    rank: int,
    steps: int = 20,
    mode: str = "attach",
    unused: bool = False,
    dtype: torch.dtype = torch.float32,
    opt_kwargs: dict | None = None,
    ours_kwargs: dict | None = None,
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, ShardedAdamW]:
    """Train DDP + torch AdamW and (DDP-attached or standalone) ShardedAdamW side by side
    from the same weights on the same per-rank batches. Returns both models and optimizers."""
    opt_kwargs = opt_kwargs or {}
    torch.manual_seed(0)
    ref_model = TinyLM().to(dtype)
    model = copy.deepcopy(ref_model)
    ref = DDP(ref_model, find_unused_parameters=unused)
    ref_opt = torch.optim.AdamW(param_groups(ref_model), **opt_kwargs)
    opt = ShardedAdamW(param_groups(model), **opt_kwargs, **(ours_kwargs or {}))
    if mode == "attach":
        net = DDP(model, find_unused_parameters=unused)
        opt.attach(net)
    else:
        net = model
    scheds = [schedule(ref_opt), schedule(opt)]
    for step in range(steps):
        x, y = batch(step, rank)
        use_branch = not unused or step % 3 != 1
        for m, o, s in ((ref, ref_opt, scheds[0]), (net, opt, scheds[1])):
            loss_fn(m(x, use_branch), y).backward()
            o.step()
            s.step()
            o.zero_grad()
    return ref_model, model, ref_opt, opt


class MasterReference:
    """A low-precision model updated from fp32 masters by torch AdamW on averaged fp32 grads."""

    def __init__(self, model: nn.Module, scale: float = 1.0, reduce_dtype=torch.float32):
        self.model = model
        self.pairs = [(p, nn.Parameter(p.detach().float())) for p in model.parameters()]
        master = {id(p): m for p, m in self.pairs}
        groups = param_groups(model)
        for g in groups:
            g["params"] = [master[id(p)] for p in g["params"]]
        self.opt = torch.optim.AdamW(groups)
        self.scale = scale
        self.reduce_dtype = reduce_dtype

    def step(self, skip: bool = False) -> None:
        world = dist.get_world_size()
        for p, m in self.pairs:
            if not p.requires_grad:
                continue
            g = p.grad.to(self.reduce_dtype).mul_(1.0 / world)
            dist.all_reduce(g)
            g = g.float()
            m.grad = g.mul_(1.0 / self.scale) if self.scale != 1.0 else g
            p.grad = None
        if not skip:
            self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            for p, m in self.pairs:
                p.copy_(m)

    def masters(self) -> dict:
        return {id(p): m for p, m in self.pairs}
