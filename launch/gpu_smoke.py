"""GPU smoke test: the NCCL data path on one GPU, in a few minutes (``launch/gpu_smoke.sh``).

Each check prints one line, PASS or FAIL with the figure it measured; the exit status is the
number of failures. What it checks:

1. No host sync in steady-state fused steps: attached-equivalent (a single process, where
   which parameters step needs no agreement), ``fused=True``, ``skip_nonfinite=True``, under
   ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call.
2. ShardedAdamW against ``torch.optim.AdamW`` on the same program, for foreach and fused,
   fp32 and bf16 parameters with fp32 masters, ``reduce_dtype=torch.bfloat16``: within
   ``REL_TOL`` relative (cuBLAS and the fused kernels are not checked for bitwise equality).
3. ``torch.compile(model)`` with Inductor on a model with odd parameter sizes (every
   parameter must start aligned inside its bucket, or Triton's aligned loads fault).
4. ``model.compile()`` with ``overlap_param_gather=True``: equal to the same run without it.
5. The local update's memory bandwidth: bytes AdamW must move per element (28 for fp32
   state: read p, g, m, v; write p, m, v) over the measured time, against ``--bandwidth``
   (the card's GB/s) if given.

Runs over NCCL on one rank (a real process group of size 1: NCCL's reduce-scatter and
all-gather run); ``--device cpu`` runs the same checks over gloo for a dry run of the script.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.nn as nn

from sharded_adamw import ShardedAdamW

REL_TOL = 1e-5
STEPS = 6


class Odd(nn.Module):
    """Linear layers with odd sizes and a layernorm: after a 13-element bias every later
    parameter would be misaligned in an unpadded bucket."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(29, 13)
        self.norm = nn.LayerNorm(13)
        self.b = nn.Linear(13, 37)
        self.c = nn.Linear(37, 7, bias=False)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.norm(self.a(x)))))


def _rel(ours: nn.Module, ref: nn.Module) -> float:
    worst = 0.0
    for p, q in zip(ours.parameters(), ref.parameters()):
        d = (p.detach().double() - q.detach().double()).abs().max().item()
        worst = max(worst, d / (q.detach().double().abs().max().item() or 1.0))
    return worst


def _train(model, opt, device, steps=STEPS, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 29, generator=g).to(device, dtype)
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()


def check_no_host_sync(device) -> str:
    model = Odd().to(device)
    opt = ShardedAdamW(model.parameters(), lr=1e-3, fused=True)
    _train(model, opt, device, steps=2)  # warm up (the first step learns the gather order)
    x = torch.randn(8, 29, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return "3 fused steps, no synchronising call"


def check_matches_adamw(device) -> str:
    out = []
    for name, kwargs, dtype in [
        ("foreach fp32", dict(foreach=True), torch.float32),
        ("fused fp32", dict(fused=True), torch.float32),
        ("bf16 reduce", dict(reduce_dtype=torch.bfloat16), torch.float32),
    ]:
        torch.manual_seed(0)
        ours = Odd().to(device, dtype)
        ref = copy.deepcopy(ours)
        ref_kwargs = {k: v for k, v in kwargs.items() if k != "reduce_dtype"}
        _train(ours, ShardedAdamW(ours.parameters(), lr=1e-3, **kwargs), device, dtype=dtype)
        _train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3, **ref_kwargs), device)
        rel = _rel(ours, ref)
        tol = 1e-2 if "bf16" in name else REL_TOL
        if rel > tol:
            raise AssertionError(f"{name}: rel {rel:.2e} > {tol:g}")
        out.append(f"{name} {rel:.1e}")
    return ", ".join(out)


def check_inductor(device) -> str:
    torch.manual_seed(0)
    ours = Odd().to(device)
    ref = copy.deepcopy(ours)
    _train(torch.compile(ours), ShardedAdamW(ours.parameters(), lr=1e-3), device)
    _train(torch.compile(ref), torch.optim.AdamW(ref.parameters(), lr=1e-3), device)
    rel = _rel(ours, ref)
    if rel > REL_TOL:
        raise AssertionError(f"rel {rel:.2e}")
    offsets = sorted({p.data_ptr() % 16 for p in ours.parameters()})
    if offsets != [0]:
        raise AssertionError(f"parameter addresses mod 16: {offsets}")
    return f"rel {rel:.1e}, every parameter 16-byte aligned"


def check_compiled_overlap(device) -> str:
    finals = []
    for overlap in (True, False):
        torch.manual_seed(0)
        model = Odd().to(device)
        model.compile()
        opt = ShardedAdamW(model.parameters(), lr=1e-3, overlap_param_gather=overlap)
        _train(model, opt, device)
        opt.sync_params()
        finals.append([p.detach().clone() for p in model.parameters()])
    if not all(torch.equal(a, b) for a, b in zip(*finals)):
        raise AssertionError("model.compile() with overlap_param_gather differs from without")
    return "bitwise equal to the run without overlap_param_gather"


def check_bandwidth(device, bandwidth: float | None) -> str:
    from benchmarks.bandwidth import update_bandwidth

    n = 2**26 if device.type == "cuda" else 2**22
    return "\n" + update_bandwidth(n, device, repeats=10, peak_gbps=bandwidth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--bandwidth", type=float, help="the card's memory bandwidth, GB/s")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    checks = [
        ("no host sync (fused)", lambda: check_no_host_sync(device)),
        ("matches torch AdamW", lambda: check_matches_adamw(device)),
        ("torch.compile (Inductor), odd sizes", lambda: check_inductor(device)),
        ("model.compile() + overlap_param_gather", lambda: check_compiled_overlap(device)),
        ("update bandwidth", lambda: check_bandwidth(device, args.bandwidth)),
    ]
    failures = 0
    for name, fn in checks:
        try:
            print(f"PASS {name}: {fn()}", flush=True)
        except Exception as e:  # noqa: BLE001 - every check reports, then the next runs
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    dist.destroy_process_group()
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
