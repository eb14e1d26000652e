"""Differential fuzzer: random training programs run with ``ShardedAdamW`` and with the oracle.

A *program* is drawn from ``(seed, world)`` (``generate``): a small model (odd/prime sizes,
tied weights, parameters larger than a bucket), 1-3 param groups with their own
hyperparameters, optimizer options (attached to DDP or standalone, foreach, overlap_comm,
overlap_param_gather, full_grads, bucket size, compile, bf16 with fp32 masters, the masters as
remainders, bf16 or int8 optimizer state), an LR scheduler, and a
list of steps. Each step has 1-3 micro-batches (with or without ``no_sync``), a presence
pattern per micro-batch and rank (every block present, used times zero, or not used at all),
``zero_grad(set_to_none=...)`` and events before its forward: freeze / unfreeze a block,
``add_param_group``, and state-dict hand-overs (ShardedAdamW -> fresh ShardedAdamW,
ShardedAdamW -> torch AdamW, torch AdamW -> ShardedAdamW).

``run_program`` runs it twice on the same W gloo ranks: "ours" (ShardedAdamW) and the oracle
(DDP + ``torch.optim.AdamW``; plain AdamW at W = 1; for bf16 a reference that steps torch
AdamW on fp32 masters with gradients averaged the way ShardedAdamW averages them, as in
``tests/test_mixed_precision.py``). With ``state_dtype`` bf16 or int8 the oracle's optimizer
state is put through the same rounding after each of its steps (``round_state``), while ours
is a ShardedAdamW; ``master_remainders`` keeps the bf16 oracle. Losses are compared every
micro-batch, parameters, param groups and optimizer state (``state_dict()`` of both) at
checkpoints: bitwise at W <= 2, to ``REL_TOL`` (max|a-b| / max|b|) at W = 3, except that
programs with bf16 or int8 state are drawn only where ours gets the oracle's gradient bits
(at W = 3 attached, without hand-overs) and are always compared bitwise
(``Program.bitwise``). ``shrink``
removes steps, events and features while the failure keeps its kind. Every rank runs the
same shrink (verdicts are all-gathered).

CLI: ``python -m tests.fuzz --seeds N [--start S] [--world-size W] [--minutes M]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

REL_TOL = 1e-6
# Several synchronising backwards before a step (no ``no_sync``): DDP re-averages the
# accumulated gradient, ShardedAdamW adds the averages (see ``accumulates_synced``); Adam turns
# the last-bit difference into up to ~2e-6 of a small parameter within two steps (seed 1005).
ACCUM_REL_TOL = 1e-5
BITWISE_MAX_WORLD = 2
COMPILE_BACKEND = "aot_eager"  # autograd + functionalization like inductor, no C++ build
UNIT_BASE = -1  # the embedding and the (maybe tied) head
HANDOVERS = ("reload", "to_torch", "to_sharded")  # events that hand the state over

# ---- programs ---------------------------------------------------------------------------


@dataclass
class BlockSpec:
    uid: int
    kind: str  # lin | mlp | norm | vec
    hidden: int = 0
    bias: bool = True


@dataclass
class GroupSpec:
    units: list[int]
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    amsgrad: bool = False
    maximize: bool = False

    def hyper(self) -> dict:
        return dict(
            lr=self.lr,
            betas=self.betas,
            weight_decay=self.weight_decay,
            amsgrad=self.amsgrad,
            maximize=self.maximize,
        )

    def show(self) -> str:
        extra = "".join(f", {k}=True" for k in ("amsgrad", "maximize") if getattr(self, k))
        units = ", ".join(_unit_name(u) for u in self.units)
        return (
            f"{{params: [{units}], lr={self.lr:g}, betas={self.betas}, "
            f"weight_decay={self.weight_decay:g}{extra}}}"
        )


@dataclass
class Event:
    kind: str  # freeze | unfreeze | add_group | reload | to_torch | to_sharded
    unit: int | None = None
    group: GroupSpec | None = None

    def show(self) -> str:
        if self.kind == "freeze":
            return f"{_unit_name(self.unit)}.requires_grad_(False)"
        if self.kind == "unfreeze":
            return f"{_unit_name(self.unit)}.requires_grad_(True)"
        if self.kind == "add_group":
            return f"opt.add_param_group({self.group.show()})  # grads of it dropped first"
        return {
            "reload": "opt = ShardedAdamW(copy); opt.load_state_dict(old.state_dict())",
            "to_torch": "opt = torch.optim.AdamW(copy); opt.load_state_dict(sharded.state_dict())",
            "to_sharded": "opt = ShardedAdamW(copy); opt.load_state_dict(adamw.state_dict())",
        }[self.kind]


@dataclass
class StepSpec:
    # micro[k][r]: per block uid, "p" present, "z" used times 0, "a" absent (not used)
    micro: list[list[dict[int, str]]]
    no_sync: bool = False
    set_to_none: bool = True
    events: list[Event] = field(default_factory=list)


@dataclass
class Program:
    seed: int
    world: int
    dim: int
    vocab: int
    blocks: list[BlockSpec]
    tied: bool
    bf16: bool
    groups: list[GroupSpec]
    late: list[int]  # units in no group at construction (added by an add_group event)
    frozen0: list[int]  # units built with requires_grad=False
    mode: str  # attach | standalone
    ddp_first: bool  # attach: DDP built before the optimizer (else after: auto-attach)
    bucket_view: bool  # attach: DDP gradient_as_bucket_view
    foreach: bool | None
    fused: bool  # torch's fused AdamW (on both sides); never with foreach=True
    bucket_cap_mb: float
    overlap_comm: bool
    overlap_param_gather: bool
    compile: str  # none | torch.compile | model.compile
    sched: str  # none | step | cosine | onecycle
    steps: list[StepSpec]
    full_grads: bool = False  # ZeRO-1 with p.grad kept (fp32 programs)
    state_dtype: str = "fp32"  # fp32 | bf16 | int8: how ShardedAdamW stores exp_avg(_sq)
    master_remainders: bool = False  # bf16 programs: fp32 masters as 16-bit remainders

    def impl(self) -> dict:
        """The implementation keywords both optimizers get."""
        return {"foreach": self.foreach, "fused": self.fused or None}

    def find_unused(self) -> bool:
        """DDP must be told: some block goes unused on some step or gets frozen mid-run."""
        absent = any(
            v == "a" for s in self.steps for m in s.micro for per in m for v in per.values()
        )
        froze = any(e.kind == "freeze" for s in self.steps for e in s.events)
        return absent or froze

    def accumulates_synced(self) -> bool:
        """Several synchronising backwards before a step at W > 1: DDP averages
        ``(previous average + local)`` per rank, ShardedAdamW adds the averages; the sums
        round differently, so such programs are held to ``ACCUM_REL_TOL``, not bitwise."""
        return self.world > 1 and any(len(s.micro) > 1 and not s.no_sync for s in self.steps)

    def exact_grads(self) -> bool:
        """ShardedAdamW's averaged gradients have the oracle's bits: at W <= 2, and attached at
        any W (DDP's own bucket is averaged in place; docs/numerics.md) as long as our DDP
        is the one built first, unless several synchronising backwards accumulate
        (``accumulates_synced``). A hand-over builds a fresh DDP, whose buckets until it
        rebuilds them hold the parameters in another order than the oracle's DDP, and gloo's
        ring adds three or more ranks in an order that depends on an element's place in the
        bucket."""
        if self.accumulates_synced():
            return False
        handover = any(e.kind in HANDOVERS for s in self.steps for e in s.events)
        return self.world <= BITWISE_MAX_WORLD or (self.mode == "attach" and not handover)

    def bitwise(self) -> bool:
        """Compared bitwise: where the gradients are exact at W <= 2, and programs with bf16
        or int8 state, which are drawn only where they are exact (``generate``): rounding the
        state turns a last-bit difference of a gradient into a whole rounding step where a
        value sits near a rounding boundary (2**-8 of a bf16 moment; an int8 code gap, which
        near zero is as large as the value: an exp_avg_sq that rounds to 0 under a nonzero
        exp_avg moves the parameter by lr * exp_avg / eps), which no tolerance would separate
        from a defect. Measured at W = 3 standalone: 4 of 30 such programs 4.5e-6 to 1.2e-4
        relative apart."""
        exact = self.world <= BITWISE_MAX_WORLD or self.state_dtype != "fp32"
        return exact and self.exact_grads()

    def show(self) -> str:
        def blk(b: BlockSpec) -> str:
            if b.kind == "mlp":
                return f"b{b.uid}=mlp({self.dim}->{b.hidden}->{self.dim})"
            if b.kind == "lin":
                return f"b{b.uid}=lin({self.dim}, bias={b.bias})"
            return f"b{b.uid}={b.kind}({self.dim})"

        dtype = "bfloat16 (fp32 masters)" if self.bf16 else "float32"
        lines = [
            f"# seed {self.seed}, world size {self.world}",
            f"model = Net(vocab={self.vocab}, dim={self.dim}, tied={self.tied}, "
            f"blocks=[{', '.join(blk(b) for b in self.blocks)}]).to({dtype})",
        ]
        for u in self.frozen0:
            lines.append(f"{_unit_name(u)}.requires_grad_(False)  # at construction")
        opts = [f"bucket_cap_mb={self.bucket_cap_mb:g}"]
        if self.foreach is not None:
            opts.append(f"foreach={self.foreach}")
        if self.fused:
            opts.append("fused=True")
        if not self.overlap_comm:
            opts.append("overlap_comm=False")
        if self.overlap_param_gather:
            opts.append("overlap_param_gather=True")
        if self.full_grads:
            opts.append("full_grads=True")
        if self.state_dtype != "fp32":
            opts.append(f"state_dtype={STATE_DTYPES[self.state_dtype]}")
        if self.master_remainders:
            opts.append("master_remainders=True")
        groups = ", ".join(g.show() for g in self.groups)
        opt_line = f"opt = ShardedAdamW([{groups}], {', '.join(opts)})"
        ddp = f"net = DDP(model, find_unused_parameters={self.find_unused()}" + (
            ", gradient_as_bucket_view=True)" if self.bucket_view else ")"
        )
        if self.mode == "attach":
            lines += [ddp, opt_line] if self.ddp_first else [opt_line, ddp + "  # auto-attach"]
        else:
            lines += [opt_line, "net = model  # standalone"]
        if self.late:
            lines.append(f"# not optimized until added: {[_unit_name(u) for u in self.late]}")
        if self.compile == "torch.compile":
            lines.append(f"model = torch.compile(model, backend={COMPILE_BACKEND!r})")
        elif self.compile == "model.compile":
            lines.append(f"model.compile(backend={COMPILE_BACKEND!r})")
        if self.sched != "none":
            lines.append(f"sched = {SCHED_SHOW[self.sched]}")
        for i, s in enumerate(self.steps):
            for e in s.events:
                lines.append(f"{i}: {e.show()}")
            micro = []
            for m in s.micro:
                if all(per == m[0] for per in m):
                    micro.append(_mask_show(m[0]))
                else:
                    micro.append(" | ".join(f"r{r}:{_mask_show(per)}" for r, per in enumerate(m)))
            ns = " under no_sync" if s.no_sync and len(s.micro) > 1 else ""
            lines.append(
                f"{i}: backward x{len(s.micro)}{ns} [{'; '.join(micro)}]; opt.step()"
                + ("; sched.step()" if self.sched != "none" else "")
                + f"; opt.zero_grad(set_to_none={s.set_to_none})"
            )
        return "\n".join(lines)


SCHED_SHOW = {
    "step": "StepLR(opt, step_size=2, gamma=0.5)",
    "cosine": "CosineAnnealingLR(opt, T_max=len(steps))",
    "onecycle": "OneCycleLR(opt, max_lr=[g.lr for g], total_steps=len(steps)+1, "
    "cycle_momentum=True)",
}


def _unit_name(u: int) -> str:
    return "base(emb,head)" if u == UNIT_BASE else f"b{u}"


def _mask_show(per: dict[int, str]) -> str:
    return " ".join(f"b{u}={v}" for u, v in sorted(per.items())) or "-"


PRIMES_DIM = (3, 5, 7, 11, 13)
PRIMES_HIDDEN = (2, 17, 29, 31, 61)
PRIMES_VOCAB = (7, 11, 37)
# int8 programs: a vocabulary and mlp widths that make the embedding, the head and the mlp
# weights at least MIN_QUANTIZED_NUMEL (4096) elements at every dim (3 * 1367 = 4101: 17
# blocks, the last one 5 elements), so that they are quantized (the other parameters, the
# mlp biases among them, keep fp32 state); an mlp may go unused or frozen, the head not
PRIMES_WIDE_INT8 = (1367, 1601, 2053)
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def generate(seed: int, world: int) -> Program:
    """A random valid program for ``world`` ranks: the oracle is defined for every choice."""
    rng = random.Random(seed * 1000003 + world)
    r = rng.random
    mode = rng.choice(["attach", "standalone"])
    compile_mode = "none"
    if r() < 0.08:
        compile_mode = rng.choice(["torch.compile", "model.compile"])
    tiny = compile_mode != "none"
    bf16 = world <= 2 and not tiny and r() < 0.2
    dim = rng.choice(PRIMES_DIM)
    kinds = ["lin", "mlp", "norm", "vec"]
    nblocks = rng.randint(1, 2 if tiny else 4)
    blocks = [
        BlockSpec(
            uid=i,
            kind=(k := rng.choice(kinds)),
            hidden=rng.choice(PRIMES_HIDDEN) if k == "mlp" else 0,
            bias=r() < 0.7,
        )
        for i in range(nblocks)
    ]
    uids = [b.uid for b in blocks]
    # param groups over units
    ngroups = rng.randint(1, min(3, nblocks + 1))
    units = [UNIT_BASE, *uids]
    rng.shuffle(units)
    late: list[int] = []
    frozen0: list[int] = []
    # add_param_group: standalone only (attach() needs exactly the DDP model's trainable
    # parameters); at W > 1 the late block trains from the start (DDP reduces it), at W = 1 it
    # may also be frozen until added.
    if mode == "standalone" and not tiny and nblocks >= 2 and r() < 0.3:
        late = [rng.choice(uids)]
    if nblocks >= 2 and r() < 0.2:
        cand = [u for u in uids if u not in late]
        frozen0 = [rng.choice(cand)]
    placed = [u for u in units if u not in late]
    assign = {u: rng.randrange(ngroups) for u in placed}
    for gi in range(ngroups):  # no empty group
        if gi not in assign.values():
            assign[placed[gi % len(placed)]] = gi
    groups = []
    for gi in range(ngroups):
        members = [u for u in sorted(assign) if assign[u] == gi]
        if members:
            groups.append(_draw_group(rng, members))
    nsteps = rng.randint(2, 4 if tiny else 8)
    sched = rng.choice(["none", "none", "step", "cosine", "onecycle"])
    per_rank_ok = world > 1  # differing presence needs find_unused_parameters (DDP defines it)
    pattern_rate = rng.choice([0.0, 0.3, 0.6])
    steps = []
    frozen_now = set(frozen0)
    trained = set()  # units that have been live (optimized and trainable) for a step
    live_groups = [set(g.units) for g in groups]
    in_opt = set().union(*live_groups)
    phase = "sharded"
    for i in range(nsteps):
        events: list[Event] = []
        if i > 0:
            if r() < 0.15:
                cand = [u for u in uids if u in trained and u not in frozen_now]
                if cand:
                    u = rng.choice(cand)
                    events.append(Event("freeze", u))
                    frozen_now.add(u)
            if world == 1 and mode == "standalone" and r() < 0.2:
                cand = [u for u in sorted(frozen_now) if u in in_opt]
                if cand:
                    u = rng.choice(cand)
                    events.append(Event("unfreeze", u))
                    frozen_now.discard(u)
            if late and late[0] not in in_opt and sched != "onecycle" and r() < 0.4:
                u = late[0]
                events.append(Event("add_group", u, _draw_group(rng, [u])))
                in_opt.add(u)
                frozen_now.discard(u)
            if not tiny and r() < 0.2:
                if phase == "torch":
                    events.append(Event("to_sharded"))
                    phase = "sharded"
                else:
                    kind = "reload" if bf16 else rng.choice(["reload", "to_torch"])
                    events.append(Event(kind))
                    phase = "torch" if kind == "to_torch" else "sharded"
        nmicro = rng.choice([1, 1, 2, 3])
        no_sync = nmicro > 1 and (bf16 or r() < 0.5)  # bf16 accumulates in p.grad only
        micro = []
        for _ in range(nmicro):
            base = {u: _draw_presence(rng, pattern_rate) for u in uids}
            per = [dict(base) for _ in range(world)]
            if per_rank_ok and r() < 0.3:
                for rr in range(world):
                    per[rr] = {u: _draw_presence(rng, pattern_rate) for u in uids}
            micro.append(per)
        steps.append(StepSpec(micro=micro, no_sync=no_sync, set_to_none=r() < 0.6, events=events))
        trained |= {u for u in uids if u in in_opt and u not in frozen_now}
    if world > 1 and mode == "standalone":
        # a late block frozen until added would be outside the oracle DDP's parameters
        pass
    elif late and world == 1 and r() < 0.5:
        frozen0 = sorted({*frozen0, *late})
    prog = Program(
        seed=seed,
        world=world,
        dim=dim,
        vocab=rng.choice(PRIMES_VOCAB),
        blocks=blocks,
        tied=r() < 0.5,
        bf16=bf16,
        groups=groups,
        late=late,
        frozen0=frozen0,
        mode=mode,
        ddp_first=r() < 0.5,
        bucket_view=r() < 0.3,
        foreach=(foreach := rng.choice([None, True, False])),
        fused=foreach is not True and r() < 0.2,
        bucket_cap_mb=rng.choice([0.0005, 0.001, 0.003, 0.01, 25.0]),
        overlap_comm=r() < 0.7,
        overlap_param_gather=r() < 0.4,
        compile=compile_mode,
        sched=sched,
        steps=steps,
        full_grads=not bf16 and r() < 0.2,  # drawn last: the other draws stay as they were
    )
    # drawn after everything else, as full_grads: every other draw of a seed stays as it was
    # (an int8 program only swaps its vocabulary and mlp widths for ones that get quantized)
    x = r() * (1.0 if world == 1 else 0.5)  # at W > 1 fewer programs qualify (exact_grads)
    prog.state_dtype = "bf16" if x < 0.15 else "int8" if x < 0.3 else "fp32"
    if not prog.exact_grads():  # see ``Program.bitwise``
        prog.state_dtype = "fp32"
    if prog.state_dtype == "int8":
        prog.vocab = rng.choice(PRIMES_WIDE_INT8)
        for b in prog.blocks:
            if b.kind == "mlp":
                b.hidden = rng.choice(PRIMES_WIDE_INT8)
    prog.master_remainders = bf16 and r() < 0.5
    return prog


def _draw_group(rng: random.Random, units: list[int]) -> GroupSpec:
    return GroupSpec(
        units=list(units),
        lr=rng.choice([1e-3, 3e-3, 1e-2, 3e-2]),
        betas=rng.choice([(0.9, 0.999), (0.8, 0.99), (0.5, 0.9)]),
        weight_decay=rng.choice([0.0, 0.01, 0.1]),
        amsgrad=rng.random() < 0.3,
        maximize=rng.random() < 0.2,
    )


def _draw_presence(rng: random.Random, rate: float) -> str:
    if rng.random() >= rate:
        return "p"
    return rng.choice(["a", "a", "z"])


# ---- the model --------------------------------------------------------------------------


class Net(nn.Module):
    """Embedding, residual blocks each of which a forward may use, use times 0 or skip, and a
    head (maybe tied to the embedding)."""

    def __init__(self, prog: Program):
        super().__init__()
        d = prog.dim
        self.emb = nn.Embedding(prog.vocab, d)
        self.blocks = nn.ModuleDict()
        for b in prog.blocks:
            if b.kind == "lin":
                m = nn.Linear(d, d, bias=b.bias)
            elif b.kind == "mlp":
                m = nn.Sequential(nn.Linear(d, b.hidden), nn.Tanh(), nn.Linear(b.hidden, d))
            elif b.kind == "norm":
                m = nn.LayerNorm(d, elementwise_affine=True, bias=b.bias)
            else:
                m = Scale(d)
            self.blocks[str(b.uid)] = m
        self.head = nn.Linear(d, prog.vocab, bias=False)
        if prog.tied:
            self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor, mask: tuple[tuple[int, str], ...]) -> torch.Tensor:
        h = self.emb(x)
        for uid, how in mask:
            if how == "a":
                continue
            out = self.blocks[str(uid)](h)
            h = h + (out * 0.0 if how == "z" else out)
        return self.head(h)

    def unit_params(self, u: int) -> list[nn.Parameter]:
        if u == UNIT_BASE:
            ps = [self.emb.weight]
            if self.head.weight is not self.emb.weight:
                ps.append(self.head.weight)
            return ps
        return list(self.blocks[str(u)].parameters())


class Scale(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.v = nn.Parameter(torch.linspace(-0.3, 0.4, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.v


def build_model(prog: Program) -> Net:
    torch.manual_seed(prog.seed)
    model = Net(prog)
    if prog.bf16:
        model = model.to(torch.bfloat16)
    for u in prog.frozen0:
        for p in model.unit_params(u):
            p.requires_grad_(False)
    return model


def batch(prog: Program, step: int, micro: int, rank: int):
    g = torch.Generator().manual_seed(prog.seed * 7919 + 1000 * step + 10 * micro + rank)
    x = torch.randint(0, prog.vocab, (3, 4), generator=g)
    return x, torch.roll(x, 1, dims=1)


def loss_fn(logits: torch.Tensor, y: torch.Tensor, vocab: int) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))


def make_sched(prog: Program, opt: torch.optim.Optimizer):
    lrs = torch.optim.lr_scheduler
    if prog.sched == "step":
        return lrs.StepLR(opt, step_size=2, gamma=0.5)
    if prog.sched == "cosine":
        return lrs.CosineAnnealingLR(opt, T_max=len(prog.steps))
    if prog.sched == "onecycle":
        return lrs.OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=len(prog.steps) + 1,
            cycle_momentum=True,
        )
    return None


# ---- the two sides ----------------------------------------------------------------------


class Side:
    """One run of the program: a model, its forward, an optimizer, a scheduler."""

    def __init__(self, prog: Program, rank: int, world: int, oracle: bool):
        self.prog, self.rank, self.world, self.oracle = prog, rank, world, oracle
        self.group_units = [list(g.units) for g in prog.groups]
        self.group_hyper = [g.hyper() for g in prog.groups]
        self.model = build_model(prog)
        self.master: dict | None = None  # bf16 oracle: param -> fp32 master
        self.ddp = None
        self.opt = None
        # oracle: round the state after each step as ours stores it (while ours is sharded)
        self.rounding = oracle and prog.state_dtype != "fp32"
        if oracle:
            self._build_oracle()
        else:
            self._build_sharded(first=True)
        self.sched = make_sched(prog, self.opt)
        self._compile()

    # construction
    def _groups(self, params_of) -> list[dict]:
        return [
            {"params": [p for u in units for p in params_of(u)], **hyper}
            for units, hyper in zip(self.group_units, self.group_hyper)
        ]

    def _ddp(self, module: nn.Module, **kw) -> DDP:
        return DDP(module, find_unused_parameters=self.prog.find_unused(), **kw)

    def _build_oracle(self) -> None:
        prog = self.prog
        if prog.bf16:
            self.master = {p: nn.Parameter(p.detach().float()) for p in self.model.parameters()}
            params_of = lambda u: [self.master[p] for p in self.model.unit_params(u)]  # noqa: E731
            self.opt = torch.optim.AdamW(self._groups(params_of), **prog.impl())
            self.kind = "torch"
            return
        if self.world > 1:
            self.ddp = self._ddp(self.model)
        self.opt = torch.optim.AdamW(self._groups(self.model.unit_params), **prog.impl())
        self.kind = "torch"

    def _build_sharded(self, first: bool = False) -> None:
        from sharded_adamw import ShardedAdamW

        prog = self.prog
        make_opt = lambda: ShardedAdamW(  # noqa: E731
            self._groups(self.model.unit_params),
            **prog.impl(),
            bucket_cap_mb=prog.bucket_cap_mb,
            overlap_comm=prog.overlap_comm,
            overlap_param_gather=prog.overlap_param_gather,
            full_grads=prog.full_grads,
            state_dtype=STATE_DTYPES[prog.state_dtype],
            master_remainders=prog.master_remainders,
        )
        if prog.mode == "attach":
            kw = dict(gradient_as_bucket_view=True) if prog.bucket_view else {}
            if prog.ddp_first:
                self.ddp = self._ddp(self.model, **kw)
                self.opt = make_opt()
            else:
                self.opt = make_opt()
                self.ddp = self._ddp(self.model, **kw)
            self.opt.attach(self.ddp)
        else:
            self.ddp = None
            self.opt = make_opt()
        self.kind = "sharded"

    def _build_torch(self) -> None:
        self.ddp = self._ddp(self.model) if self.world > 1 else None
        self.opt = torch.optim.AdamW(self._groups(self.model.unit_params), **self.prog.impl())
        self.kind = "torch"

    def _compile(self) -> None:
        self.fwd_module = self.ddp if self.ddp is not None else self.model
        how = self.prog.compile
        if how == "torch.compile":
            self.fwd = torch.compile(self.fwd_module, backend=COMPILE_BACKEND)
        else:
            if how == "model.compile":
                self.fwd_module.compile(backend=COMPILE_BACKEND)
            self.fwd = self.fwd_module

    def rebuild(self, kind: str) -> None:
        """Hand the run over to a fresh optimizer of ``kind`` over a copy of the model,
        through ``state_dict()`` / ``load_state_dict`` (scheduler too)."""
        old_model, old_opt, old_sched = self.model, self.opt, self.sched
        if hasattr(old_opt, "sync_params"):
            old_opt.sync_params()
        sd = old_opt.state_dict()
        model = Net(self.prog)
        if self.prog.bf16:
            model = model.to(torch.bfloat16)
        model.load_state_dict(old_model.state_dict())
        for p, q in zip(old_model.parameters(), model.parameters()):
            q.requires_grad_(p.requires_grad)  # a checkpoint has no p.grad: q.grad stays None
        self.model = model
        if kind == "sharded":
            self._build_sharded()
        else:
            self._build_torch()
        self.sched = make_sched(self.prog, self.opt)
        self.opt.load_state_dict(sd)
        if old_sched is not None:
            self.sched.load_state_dict(old_sched.state_dict())
        self._compile()
        del old_opt, old_model, old_sched
        gc.collect()

    # the program's actions
    def event(self, e: Event) -> None:
        if e.kind in ("freeze", "unfreeze"):
            for p in self.model.unit_params(e.unit):
                p.requires_grad_(e.kind == "unfreeze")
        elif e.kind == "add_group":
            ps = self.model.unit_params(e.unit)
            for p in ps:
                p.grad = None
                p.requires_grad_(True)
            self.group_units.append([e.unit])
            self.group_hyper.append(e.group.hyper())
            if self.master is not None:
                ps = [self.master[p] for p in ps]
            self.opt.add_param_group({"params": ps, **e.group.hyper()})
        elif self.oracle:  # the oracle goes on, without the gradients a checkpoint drops
            self.model.zero_grad(set_to_none=True)
            # ours now steps torch AdamW (fp32 state), or has loaded the fp32 state into a
            # ShardedAdamW, which rounds all of it
            self.rounding = self.prog.state_dtype != "fp32" and e.kind != "to_torch"
            if self.rounding:
                for p, st in self.opt.state.items():
                    round_state(st, p.numel(), self.prog.state_dtype)
        else:
            self.rebuild("torch" if e.kind == "to_torch" else "sharded")

    def no_sync(self):
        if self.ddp is not None:
            return self.ddp.no_sync()
        if self.kind == "sharded" and not self.oracle:
            return self.opt.no_sync()
        return contextlib.nullcontext()

    def forward_backward(self, x, y, mask) -> torch.Tensor:
        loss = loss_fn(self.fwd(x, mask), y, self.prog.vocab)
        loss.backward()
        return loss.detach()

    def step(self) -> None:
        if self.master is not None:
            self._master_step()
        else:
            self._opt_step()
        if self.sched is not None:
            self.sched.step()

    def _opt_step(self) -> None:
        """``opt.step()``; the oracle then rounds the state of the parameters that stepped
        (their ``step`` went up) as ours stores it (``round_state``)."""
        if not self.rounding:
            self.opt.step()
            return
        before = {p: float(st.get("step", 0)) for p, st in self.opt.state.items()}
        self.opt.step()
        for p, st in self.opt.state.items():
            if float(st.get("step", 0)) != before.get(p, 0.0):
                round_state(st, p.numel(), self.prog.state_dtype)

    def _master_step(self) -> None:
        """Average p.grad in fp32 the way ShardedAdamW does (cast, times 1/W, sum), where any
        rank has one (zeros from the others, as DDP with unused parameters), step torch AdamW
        on the fp32 masters and round them into the bf16 model."""
        params = list(self.model.parameters())
        flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        if self.world > 1:
            dist.all_reduce(flags)
        for p, flag in zip(params, flags.tolist()):
            m = self.master[p]
            if not flag:
                m.grad = None
                continue
            g = p.grad.float() if p.grad is not None else torch.zeros_like(m)
            g = g.mul(1.0 / self.world)
            if self.world > 1:
                dist.all_reduce(g)
            m.grad = g
        self._opt_step()
        with torch.no_grad():
            for p in params:
                p.copy_(self.master[p])
                self.master[p].grad = None

    def zero_grad(self, set_to_none: bool) -> None:
        if self.master is not None:
            self.model.zero_grad(set_to_none=set_to_none)
        else:
            self.opt.zero_grad(set_to_none=set_to_none)

    # observation
    def params(self) -> dict[str, torch.Tensor]:
        if hasattr(self.opt, "sync_params"):
            self.opt.sync_params()
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def state(self) -> dict:
        sd = self.opt.state_dict()
        if self.master is not None:  # ShardedAdamW's format: fp32 masters as master_param
            index = 0
            for g in self.opt.param_groups:
                for m in g["params"]:
                    entry = sd["state"].get(index)
                    if entry is not None:
                        entry["master_param"] = m.detach().clone()
                    index += 1
        return sd


def round_state(state: dict, numel: int, fmt: str) -> None:
    """The oracle's model of ShardedAdamW's state stores (``core/state_formats.py``), in place
    on a torch AdamW state entry: bf16 moments are rounded to nearest-even; int8 moments of a
    parameter of at least ``MIN_QUANTIZED_NUMEL`` elements are its flat values, zero-padded
    to whole blocks of ``BLOCK`` from its first element, quantized and read back (exp_avg
    signed, the squares unsigned); a smaller parameter's stay fp32.

    Rounding values read back is the identity (bf16; int8 since the signed map holds -1),
    which lets the oracle round just the parameters that stepped where ours writes every
    parameter's state back: fused AdamW standalone at W > 1 (which parameters had a
    gradient on no rank is agreed on the device, ``update._Fp32State.write_back``)."""
    from sharded_adamw.core.state_formats import BLOCK, MIN_QUANTIZED_NUMEL, BlockwiseInt8

    if fmt == "int8" and numel < MIN_QUANTIZED_NUMEL:
        return
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        t = state.get(key)
        if t is None:
            continue
        if fmt == "bf16":
            t.copy_(t.to(torch.bfloat16).float())
            continue
        flat = nn.functional.pad(t.detach().reshape(-1), (0, -t.numel() % BLOCK))
        codec = BlockwiseInt8(flat.numel(), signed=key == "exp_avg", device=t.device)
        codec.write(flat, 0, flat.numel())
        t.copy_(codec.read(0, flat.numel())[: t.numel()].view_as(t))


# ---- comparison -------------------------------------------------------------------------


def _close(a: torch.Tensor, b: torch.Tensor, bitwise: bool, tol: float = REL_TOL) -> str | None:
    """None when ``a`` (ours) matches ``b`` (the oracle), else what differs."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    if torch.equal(a, b):
        return None
    a64, b64 = a.double(), b.double()
    diff = (a64 - b64).abs().max().item()
    scale = b64.abs().max().item() or 1.0
    rel = diff / scale
    if diff != diff or bitwise or rel > tol:
        return f"max|a-b| {diff:.3g}, rel {rel:.3g}" + (" (not bitwise)" if bitwise else "")
    return None


def compare_params(ours: Side, ref: Side, bitwise: bool, tol: float = REL_TOL) -> str | None:
    a, b = ours.params(), ref.params()
    for name, t in b.items():
        why = _close(a[name], t, bitwise, tol)
        if why:
            return f"param {name}: {why}"
    return None


GROUP_KEYS = ("lr", "betas", "weight_decay", "eps", "amsgrad", "maximize")
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")


def compare_state(ours: Side, ref: Side, bitwise: bool, tol: float = REL_TOL) -> str | None:
    sa, sb = ours.state(), ref.state()
    if len(sa["param_groups"]) != len(sb["param_groups"]):
        return f"{len(sa['param_groups'])} param groups vs {len(sb['param_groups'])}"
    for gi, (ga, gb) in enumerate(zip(sa["param_groups"], sb["param_groups"])):
        for k in GROUP_KEYS:
            va, vb = ga.get(k), gb.get(k)
            if isinstance(va, list | tuple):
                va, vb = tuple(va), tuple(vb)
            if va != vb:
                return f"param_groups[{gi}][{k!r}]: {va} vs {vb}"
        if ga["params"] != gb["params"]:
            return f"param_groups[{gi}] params {ga['params']} vs {gb['params']}"
    names = [n for n, _ in _group_order_names(ref)]
    for i in sorted(set(sa["state"]) | set(sb["state"])):
        ea, eb = sa["state"].get(i, {}), sb["state"].get(i, {})
        label = f"state of {names[i] if i < len(names) else i}"
        sta, stb = float(ea.get("step", 0)), float(eb.get("step", 0))
        if sta != stb:
            return f"{label}: step {sta:g} vs {stb:g}"
        if stb == 0:
            continue
        for k in STATE_KEYS:
            if k not in eb:
                continue
            if k not in ea:
                return f"{label}: no {k!r}"
            why = _close(ea[k], eb[k], bitwise, tol)
            if why:
                return f"{label}[{k!r}]: {why}"
    return None


def _group_order_names(side: Side) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) in state-dict index order (the groups' order)."""
    names = {p: n for n, p in side.model.named_parameters()}
    out = []
    for units in side.group_units:
        for u in units:
            for p in side.model.unit_params(u):
                out.append((names[p], p))
    return out


# ---- running ----------------------------------------------------------------------------


class OracleError(Exception):
    """The oracle itself failed: a generator bug, not a finding."""


AGREED = "agreed"


def _debug(rank: int, what: str) -> None:
    if os.environ.get("FUZZ_DEBUG"):
        print(f"[rank {rank}] {what}", file=sys.stderr, flush=True)


def run_program(prog: Program, rank: int, world: int):
    """Run ``prog`` on this rank; ``None`` if ours matched the oracle, else ``(kind, detail)``
    with kind ``mismatch``, ``error:<Type>`` (ours raised) or ``oracle-error``; or
    ``(AGREED, that)`` once the ranks have agreed on it."""
    bitwise = prog.bitwise()
    tol = ACCUM_REL_TOL if prog.accumulates_synced() else REL_TOL
    checkpoints = {len(prog.steps) - 1} | {i for i in range(len(prog.steps)) if i % 3 == 2}
    ours = ref = None
    where = "build"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ref = Side(prog, rank, world, oracle=True)
            except Exception as e:
                raise OracleError(repr(e)) from e
            ours = Side(prog, rank, world, oracle=False)
            for i, s in enumerate(prog.steps):
                where = f"step {i}"
                losses = {}
                for side in (ref, ours):
                    try:
                        for e in s.events:
                            where = f"step {i} {e.kind}"
                            _debug(rank, f"{'ours' if side is ours else 'ref'} {where}")
                            side.event(e)
                        where = f"step {i}"
                        out = []
                        for k, masks in enumerate(s.micro):
                            x, y = batch(prog, i, k, rank)
                            mask = tuple(sorted(masks[rank].items()))
                            sync = s.no_sync and k < len(s.micro) - 1
                            _debug(rank, f"{'ours' if side is ours else 'ref'} {where} micro {k}")
                            with side.no_sync() if sync else contextlib.nullcontext():
                                out.append(side.forward_backward(x, y, mask))
                        _debug(rank, f"{'ours' if side is ours else 'ref'} {where} opt.step()")
                        side.step()
                        side.zero_grad(s.set_to_none)
                    except Exception as e:
                        if side is ref:
                            raise OracleError(f"{where}: {e!r}") from e
                        raise
                    losses[side is ours] = out
                why = None
                for k, (la, lb) in enumerate(zip(losses[True], losses[False])):
                    why = why or _close(la, lb, bitwise, tol)
                    if why:
                        why = f"step {i} micro-batch {k}: loss {why}"
                if not why and i in checkpoints:
                    why = compare_params(ours, ref, bitwise, tol)
                    why = why or compare_state(ours, ref, bitwise, tol)
                    why = why and f"after step {i}: {why}"
                # every rank stops at the same step (or none does): the next step's
                # collectives must pair up
                res = agreed(("mismatch", why) if why else None, world)
                if res is not None:
                    return AGREED, res
        return None
    except OracleError as e:
        return "oracle-error", str(e)
    except Exception as e:
        _debug(rank, f"{where}: {e!r}")
        frame = traceback.extract_tb(e.__traceback__)[-1]
        at = "/".join(frame.filename.rsplit("/", 2)[-2:]) + f":{frame.lineno}"
        return f"error:{type(e).__name__}", f"{where}: {str(e)[:400]} (raised at {at})"
    finally:
        del ours, ref
        gc.collect()


def agreed(result, world: int):
    """Every rank's result, all-gathered: the first failing rank's, tagged with the rank."""
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, result)
    else:
        every = [result]
    for r, res in enumerate(every):
        if res is not None:
            return res[0], f"rank {r}: {res[1]}"
    return None


def check(prog: Program, rank: int, world: int):
    """The verdict on ``prog``, the same on every rank."""
    torch.manual_seed(0)
    res = run_program(prog, rank, world)
    if res is not None and res[0] == AGREED:
        return res[1]
    return agreed(res, world)


# ---- shrinking --------------------------------------------------------------------------


def _candidates(p: Program):
    """Smaller or simpler variants of ``p``, most reducing first."""
    n = len(p.steps)
    for cut in range(1, n):  # drop trailing steps
        yield _with(p, steps=p.steps[:cut])
    for i in range(n):
        if n > 1:
            yield _with(p, steps=p.steps[:i] + p.steps[i + 1 :])
    for i, s in enumerate(p.steps):
        for j in range(len(s.events)):
            yield _with_step(p, i, events=s.events[:j] + s.events[j + 1 :])
    for b in p.blocks:
        if len(p.blocks) > 1:
            yield _drop_block(p, b.uid)
    if p.compile != "none":
        yield _with(p, compile="none")
    if p.bf16:
        yield _with(p, bf16=False, master_remainders=False)
    if p.sched != "none":
        yield _with(p, sched="none")
    if len(p.groups) > 1:
        merged = copy.deepcopy(p.groups[0])
        merged.units = [u for g in p.groups for u in g.units]
        yield _with(p, groups=[merged])
    for gi, g in enumerate(p.groups):
        for k, v in (("amsgrad", False), ("maximize", False), ("weight_decay", 0.0)):
            if getattr(g, k) != v:
                groups = copy.deepcopy(p.groups)
                setattr(groups[gi], k, v)
                yield _with(p, groups=groups)
    if p.frozen0:
        unfrozen = [e for s in p.steps for e in s.events if e.kind in ("unfreeze", "add_group")]
        if not unfrozen:
            yield _with(p, frozen0=[])
    for i, s in enumerate(p.steps):
        if len(s.micro) > 1:
            yield _with_step(p, i, micro=s.micro[:1], no_sync=False)
        if s.no_sync:
            yield _with_step(p, i, no_sync=False)
        if not s.set_to_none:
            yield _with_step(p, i, set_to_none=True)
        for k, per in enumerate(s.micro):
            if any(d != per[0] for d in per):
                yield _with_micro(p, i, k, [dict(per[0]) for _ in per])
            if any(v != "p" for d in per for v in d.values()):
                yield _with_micro(p, i, k, [{u: "p" for u in d} for d in per])
    for k, v in (
        ("overlap_param_gather", False),
        ("full_grads", False),
        ("master_remainders", False),
        ("state_dtype", "fp32"),
        ("overlap_comm", True),
        ("bucket_cap_mb", 25.0),
        ("foreach", None),
        ("fused", False),
        ("mode", "standalone"),
        ("bucket_view", False),
        ("tied", False),
    ):
        if getattr(p, k) != v and not (k == "mode" and p.world == 1 and False):
            yield _with(p, **{k: v})


def _with(p: Program, **kw) -> Program:
    return dataclasses.replace(copy.deepcopy(p), **kw)


def _with_step(p: Program, i: int, **kw) -> Program:
    q = copy.deepcopy(p)
    q.steps[i] = dataclasses.replace(q.steps[i], **kw)
    return q


def _with_micro(p: Program, i: int, k: int, per: list[dict]) -> Program:
    q = copy.deepcopy(p)
    q.steps[i].micro[k] = per
    return q


def _drop_block(p: Program, uid: int) -> Program:
    q = copy.deepcopy(p)
    q.blocks = [b for b in q.blocks if b.uid != uid]
    for g in q.groups:
        g.units = [u for u in g.units if u != uid]
    q.groups = [g for g in q.groups if g.units]
    q.late = [u for u in q.late if u != uid]
    q.frozen0 = [u for u in q.frozen0 if u != uid]
    for s in q.steps:
        s.events = [e for e in s.events if e.unit != uid]
        for per in s.micro:
            for d in per:
                d.pop(uid, None)
    return q


def valid(p: Program) -> bool:
    """Shrinking must keep the oracle defined (the generator's constraints)."""
    if not p.groups or not p.steps:
        return False
    if p.full_grads and p.bf16:
        return False  # p.grad in bf16 holds a rounded average: not the oracle's fp32 one
    if p.master_remainders and not p.bf16:
        return False  # remainders of fp32 masters of bf16 parameters only
    if p.state_dtype != "fp32" and not p.exact_grads():
        return False  # no tolerance holds rounded state to the oracle (``Program.bitwise``)
    if p.world > 1 or p.mode == "attach":
        if any(e.kind == "unfreeze" for s in p.steps for e in s.events):
            return False
    if p.mode == "attach" and p.late:
        return False
    if p.sched == "onecycle" and any(e.kind == "add_group" for s in p.steps for e in s.events):
        return False  # OneCycleLR has no max_lr for a group added later
    if p.world > 1 and p.mode == "standalone" and set(p.late) & set(p.frozen0):
        return False
    added = {e.unit for s in p.steps for e in s.events if e.kind == "add_group"}
    if set(p.late) - added and p.world == 1 and set(p.late) & set(p.frozen0):
        pass  # frozen and never added: fine
    phase = "sharded"
    for s in p.steps:
        for e in s.events:
            if e.kind == "to_sharded" and phase != "torch":
                return False
            if e.kind in ("to_torch", "reload") and phase == "torch":
                return False
            if e.kind == "to_torch":
                phase = "torch"
            elif e.kind == "to_sharded":
                phase = "sharded"
    if p.bf16 and any(
        len(s.micro) > 1 and not s.no_sync for s in p.steps
    ):  # bf16 accumulation without no_sync has no bitwise oracle
        return False
    return True


def _greedy(prog: Program, still_fails, budget: int) -> tuple[Program, object, int]:
    """Take the first valid candidate for which ``still_fails`` returns a failure (not None),
    until none does or ``budget`` candidates are tried. Returns (program, failure, runs)."""
    runs, failure, progress = 0, None, True
    while progress and runs < budget:
        progress = False
        for cand in _candidates(prog):
            if not valid(cand):
                continue
            if runs >= budget:
                break
            runs += 1
            res = still_fails(cand)
            if res is not None:
                prog, failure, progress = cand, res, True
                break
    return prog, failure, runs


def shrink(prog: Program, failure, rank: int, world: int, budget: int = 60):
    """Greedy: the smallest program found that still fails the same way.
    Returns (program, failure, runs)."""

    def same_kind(cand):
        res = check(cand, rank, world)
        return res if res is not None and res[0] == failure[0] else None

    small, res, runs = _greedy(prog, same_kind, budget)
    return small, res or failure, runs


def _note(path: str | None, rank: int, **what) -> None:
    """Rank 0 records what it is about to run, for a crash (a collective mismatch aborts
    the processes) to be attributed from outside."""
    if path and rank == 0:
        with open(path, "w") as f:
            json.dump(what, f)


def fuzz_seeds(
    rank: int, world: int, seeds: list[int], budget: int = 60, progress: str | None = None
) -> list[dict]:
    """Run ``seeds`` at this world size; shrink each failure. Same on every rank."""
    out = []
    for seed in seeds:
        prog = generate(seed, world)
        t0 = time.monotonic()
        _note(progress, rank, seed=seed, phase="run", program=prog.show())
        res = check(prog, rank, world)
        item = {"seed": seed, "world": world, "failure": res, "program": prog.show()}
        if res is not None and res[0] != "oracle-error":
            _note(progress, rank, seed=seed, phase="shrink", program=prog.show(), failure=res)
            small, sres, runs = shrink(prog, res, rank, world, budget)
            item.update(minimal=small.show(), minimal_failure=sres, shrink_runs=runs)
        item["seconds"] = time.monotonic() - t0
        out.append(item)
        if progress and rank == 0:  # survives a crash of a later seed
            with open(progress + ".done", "a") as f:
                f.write(json.dumps(item) + "\n")
    return out


def run_seeds(world: int, seeds: list[int], budget: int, timeout: float = 600.0) -> list[dict]:
    """``fuzz_seeds`` in spawned processes, surviving crashes: a spawn that dies (a
    collective mismatch aborts gloo) is attributed to the seed rank 0 was running, which is
    reported as ``crash`` with its program, and the remaining seeds run in a fresh spawn."""
    from . import distributed

    out: list[dict] = []
    todo = list(seeds)
    with tempfile.TemporaryDirectory() as tmp:
        progress = os.path.join(tmp, "progress.json")
        while todo:
            if os.path.exists(progress):
                os.remove(progress)
            if os.path.exists(progress + ".done"):
                os.remove(progress + ".done")
            try:
                out += distributed.run(fuzz_seeds, world, todo, budget, progress, timeout=timeout)[
                    0
                ]
                return out
            except AssertionError as e:
                if not os.path.exists(progress):
                    raise
                if os.path.exists(progress + ".done"):
                    with open(progress + ".done") as f:
                        for line in f:
                            item = json.loads(line)
                            item["failure"] = item["failure"] and tuple(item["failure"])
                            out.append(item)
                with open(progress) as f:
                    note = json.load(f)
                crash = ("crash", f"the spawn died: {_tail(str(e))}")
                item = {
                    "seed": note["seed"],
                    "world": world,
                    "failure": crash,
                    "program": note["program"],
                    "seconds": 0.0,
                }
                if note["phase"] == "shrink":  # the seed failed first, a candidate crashed
                    item["failure"] = tuple(note["failure"])
                    item["note"] = "a shrink candidate of it then crashed the spawn"
                out.append(item)
                todo = todo[todo.index(note["seed"]) + 1 :]
    return out


def _tail(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "Error" in ln or "died" in ln or "enforce" in ln]
    return " / ".join((keep or lines)[-3:])[:600]


def _run_one(rank: int, world: int, prog: Program):
    return check(prog, rank, world)


def shrink_crash(prog: Program, budget: int) -> tuple[Program, int]:
    """Shrink a program that crashes the spawn: one spawn per candidate (slow; CLI only)."""
    from . import distributed

    def crashes(cand):
        try:
            distributed.run(_run_one, prog.world, cand, timeout=120.0)
        except AssertionError:
            return "crash"
        return None

    small, _, runs = _greedy(prog, crashes, budget)
    return small, runs


def report(item: dict, file=None) -> str:
    if item["failure"] is None:
        text = f"seed {item['seed']} W={item['world']}: ok ({item['seconds']:.1f}s)"
    else:
        kind, detail = item["failure"]
        text = f"seed {item['seed']} W={item['world']}: FAIL {kind}: {detail}"
        if "minimal" in item:
            mk, md = item["minimal_failure"]
            text += f"\n  ({item['note']})" if "note" in item else ""
            text += (
                f"\n  minimal program ({item['shrink_runs']} shrink runs), {mk}: {md}\n    "
                + item["minimal"].replace("\n", "\n    ")
            )
    if file is not None:
        print(text, file=file, flush=True)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=0, help="how many seeds per world size")
    ap.add_argument("--start", type=int, default=1000, help="first seed")
    ap.add_argument("--world-size", type=int, action="append", help="1, 2 or 3 (repeatable)")
    ap.add_argument("--minutes", type=float, default=0.0, help="per world size, if no --seeds")
    ap.add_argument("--shrink-budget", type=int, default=80, help="runs per failing seed")
    ap.add_argument("--crash-shrink-budget", type=int, default=20, help="spawns per crash")
    ap.add_argument("--chunk", type=int, default=10, help="seeds per spawn")
    args = ap.parse_args(argv)
    if not args.seeds and not args.minutes:
        ap.error("give --seeds N or --minutes M")
    failing = []
    for w in args.world_size or [1, 2, 3]:
        print(f"== world size {w}", flush=True)
        seed, t_end, n = args.start, time.monotonic() + 60 * args.minutes, 0
        while (seed < args.start + args.seeds) if args.seeds else time.monotonic() < t_end:
            stop = args.start + args.seeds if args.seeds else seed + args.chunk
            chunk = list(range(seed, min(stop, seed + args.chunk)))
            for item in run_seeds(w, chunk, args.shrink_budget):
                n += 1
                if item["failure"] is not None and item["failure"][0] == "crash":
                    prog = generate(item["seed"], w)
                    small, runs = shrink_crash(prog, args.crash_shrink_budget)
                    item.update(minimal=small.show(), minimal_failure=item["failure"])
                    item["shrink_runs"] = runs
                report(item, file=sys.stdout)
                if item["failure"] is not None:
                    failing.append((w, item["seed"]))
            seed = chunk[-1] + 1
        print(f"== W={w}: {n} seeds run", flush=True)
    print(f"failing (world size, seed): {failing}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
