"""How easy the package is to change, measured from the source and from one traced step.

Prints, for the closing notes of refactors:

- the package files and cross-file calls one ``step()`` goes through, standalone and attached to
  DDP (``sys.setprofile`` on rank 0 of a 2-process gloo run, one traced step after two warm-up
  steps: calls from one package file into a function of another);
- the longest class and the longest function (lines, from ``ast``);
- reads of another module's private names: ``x._name`` where ``x`` is not ``self``/``cls`` and
  ``_name`` is defined (assigned on ``self`` or as a def) only in other modules of the
  package, in the package and in ``tests/``;
- what importing the package changes in torch (clipping functions, DDP's constructor,
  ``sys.meta_path``), in a fresh interpreter;
- source bytes by folder of the installed package, and the README's length.

Run: ``python -m benchmarks.house``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sharded_adamw"


def _sources(folder: Path) -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text()) for p in sorted(folder.rglob("*.py"))}


def longest(trees: dict[Path, ast.Module]) -> dict:
    """The longest class and function (and method) by lines."""
    best = {"class": (0, ""), "function": (0, "")}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            kind = (
                "class"
                if isinstance(node, ast.ClassDef)
                else "function"
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                else None
            )
            if kind:
                n = node.end_lineno - node.lineno + 1
                if n > best[kind][0]:
                    best[kind] = (n, f"{path.relative_to(ROOT)}:{node.name}")
    return {k: f"{n} lines ({where})" for k, (n, where) in best.items()}


def _defined_private(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name.startswith("_"):
            names.add(node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
            and node.attr.startswith("_")
        ):
            names.add(node.attr)
        elif isinstance(node, ast.Assign):  # class-level private constants
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id.startswith("_"):
                    names.add(t.id)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def private_reads(package: dict[Path, ast.Module], readers: dict[Path, ast.Module]) -> dict:
    """Count ``x._name`` in ``readers`` where ``_name`` is defined in the package but not in
    the reading module itself."""
    defined = {p: _defined_private(t) for p, t in package.items()}
    everywhere = set().union(*defined.values())
    counts: Counter = Counter()
    for path, tree in readers.items():
        own = defined.get(path, set())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in everywhere
                and node.attr not in own
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                counts[str(path.relative_to(ROOT))] += 1
    return {"total": sum(counts.values()), "modules": len(counts), "by_module": dict(counts)}


IMPORT_PROBE = """
import sys, json, torch, torch.nn.utils, torch.nn.utils.clip_grad as cg
from torch.nn.parallel import DistributedDataParallel as DDP
names = ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_", "get_total_norm"]
def snap():
    s = {f"torch.nn.utils.{n}": id(getattr(torch.nn.utils, n, None)) for n in names}
    s.update({f"clip_grad.{n}": id(getattr(cg, n, None)) for n in names})
    s["DistributedDataParallel.__init__"] = id(DDP.__init__)
    s["sys.meta_path"] = tuple(id(f) for f in sys.meta_path)
    return s
before = snap()
import importlib, pkgutil, sharded_adamw
for m in pkgutil.walk_packages(sharded_adamw.__path__, "sharded_adamw."):
    importlib.import_module(m.name)
after = snap()
print(json.dumps(sorted(k for k in before if before[k] != after[k])))
"""


def import_side_effects() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def package_size() -> dict:
    parts: Counter = Counter()
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE)
        part = rel.parts[0] if len(rel.parts) > 1 else "(top)"
        parts[part] += p.stat().st_size
    total = sum(parts.values())
    return {"total_kib": round(total / 1024, 1)} | {
        k: f"{v / 1024:.1f} KiB ({100 * v / total:.0f}%)" for k, v in sorted(parts.items())
    }


def _trace_worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from sharded_adamw import ShardedAdamW

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = ShardedAdamW(model.parameters(), lr=1e-3, bucket_cap_mb=0.0002)
    if mode == "attached":
        model = torch.nn.parallel.DistributedDataParallel(model)
        opt.attach(model)

    def train_step() -> None:
        model(torch.randn(4, 8)).sum().backward()

    for _ in range(2):
        train_step()
        opt.step()
        opt.zero_grad()
    train_step()
    pkg = str(PACKAGE)
    files: set[str] = set()
    edges: Counter = Counter()

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = frame.f_code.co_filename
        if not callee.startswith(pkg):
            return
        files.add(callee)
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(pkg):
            caller = caller.f_back  # through torch frames: who in the package called in
        if caller is not None and caller.f_code.co_filename != callee:
            edges[(caller.f_code.co_filename, callee, frame.f_code.co_name)] += 1

    sys.setprofile(profile)
    opt.step()
    sys.setprofile(None)
    if rank == 0:
        rel = lambda f: str(Path(f).relative_to(PACKAGE))  # noqa: E731
        Path(out).write_text(
            json.dumps(
                {
                    "files": sorted(rel(f) for f in files),
                    "cross_file_calls": sum(edges.values()),
                    "distinct_cross_file_calls": len(edges),
                    "edges": sorted(
                        f"{rel(a)} -> {rel(b)}:{n} x{c}" for (a, b, n), c in edges.items()
                    ),
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


def step_trace(mode: str) -> dict:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "trace.json")
        mp.start_processes(_trace_worker, args=(2, port, mode, out), nprocs=2, start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    package = _sources(PACKAGE)
    tests = _sources(ROOT / "tests")
    report = {
        "step() standalone": step_trace("standalone"),
        "step() attached": step_trace("attached"),
        "longest": longest(package),
        "private reads, package": private_reads(package, package),
        "private reads, tests": private_reads(package, tests),
        "import side effects": import_side_effects(),
        "package source": package_size(),
        "README lines": len((ROOT / "README.md").read_text().splitlines()),
    }
    for k, v in report.items():
        print(f"{k}: {json.dumps(v, indent=1) if isinstance(v, dict) else v}")


if __name__ == "__main__":
    main()
