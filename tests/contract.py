"""What ``test_optim_contract.py``'s checks stand on: torch's AdamW inputs, the subject under
test, the runner, and bitwise comparisons.

A check is a function ``check_<name>(s)``, registered with ``@check``, that raises on
failure; ``run_checks`` runs every registered check for a subject and returns
``{name: outcome}``. The test module runs it in fresh processes: importing torch's test
helpers (``torch.testing._internal``) freezes the ``torch.backends`` flags of the whole
process (``disable_global_flags``), which must not leak into the pytest process.
"""

from __future__ import annotations

import copy
import gc
import os
import queue
import time
import traceback
from collections.abc import Callable, Iterable

import torch
import torch.multiprocessing as mp
import torch.nn as nn

from sharded_adamw import ShardedAdamW

# torch's three implementations of the update; the keyword that selects each
IMPLS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


# ---- the subject and torch's inputs ---------------------------------------------------------


def adamw_info():
    """The ``OptimizerInfo`` that PyTorch's optimizer tests use for ``torch.optim.AdamW``."""
    from torch.testing._internal.common_optimizers import optim_db

    (info,) = [o for o in optim_db if o.optim_cls is torch.optim.AdamW]
    return info


def optim_inputs(info) -> list[tuple[str, dict]]:
    """``(desc, kwargs)`` of the AdamW variants torch tests on the CPU in float32."""
    out = []
    for oi in info.optim_inputs_func(device="cpu", dtype=torch.float32):
        # capturable=True variants exist for CUDA graphs: torch lists them for CUDA devices
        # only (its step tensors must live on the GPU) and rejects them for CPU parameters.
        if oi.kwargs.get("capturable") or "capturable" in oi.desc:
            continue
        out.append((oi.desc, oi.kwargs))
    return out


class Subject:
    """The optimizer class under test (``kind`` "torch" or "sharded") and torch's inputs.

    ``allow`` names the checks where ShardedAdamW is held to its documented behaviour instead
    of torch's (the test module's ``ALLOW_LIST``). ``inputs`` are all of torch's inputs;
    ``light`` the ones for checks whose subject is the API rather than the numbers: all of
    them on one process, torch's default alone at ``world`` > 1, where every ShardedAdamW
    built opens a side channel (a gloo group and two store clients) and construction costs
    tenths of a second."""

    def __init__(self, kind: str, allow: Iterable[str] = (), world: int = 1):
        self.kind = kind
        self.world = world
        self.cls = torch.optim.AdamW if kind == "torch" else ShardedAdamW
        self.allow = set(allow) if kind == "sharded" else set()
        self.info = adamw_info()
        self.inputs = optim_inputs(self.info)
        self.light = self.inputs if world == 1 else self.inputs[:1]

    def make(self, params, **kwargs):
        return self.cls(params, **kwargs)

    def allowed(self, check: str) -> bool:
        return check in self.allow


CHECKS: dict[str, Callable[[Subject], None]] = {}


def check(fn: Callable[[Subject], None]) -> Callable[[Subject], None]:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def run_checks(kind: str, allow: Iterable[str] = (), world: int = 1) -> dict[str, dict]:
    """``{check name: {"error": None or what failed, "seconds": ...}}`` for one subject."""
    s = Subject(kind, allow, world)
    out = {}
    for name, fn in CHECKS.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            fn(s)
            error = None
        except Exception as e:  # noqa: BLE001 - every failure is an outcome
            error = describe(e)
        out[name] = {"error": error, "seconds": round(time.perf_counter() - start, 3)}
        gc.collect()
    return out


def _fresh_worker(fn, args, results) -> None:
    torch.set_num_threads(1)
    try:
        results.put(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put(("error", traceback.format_exc()))


def run_in_fresh_process(fn, *args, timeout: float = 240.0):
    """``fn(*args)`` computed in a new process (no process group)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_fresh_worker, args=(fn, args, results), daemon=True)
    proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                status, value = results.get(timeout=1.0)
                break
            except queue.Empty:
                if proc.exitcode is not None and results.empty():
                    raise AssertionError(
                        f"the process died without reporting (exit code {proc.exitcode})"
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"no result after {timeout}s") from None
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise AssertionError(f"fresh process failed:\n{value}")
    return value


class Described(AssertionError):
    """A failure whose message already says what failed where."""


def describe(e: BaseException) -> str:
    """``Type: message [the check's line; where it was raised, if outside the tests]``."""
    if isinstance(e, Described):
        return str(e)
    frames = traceback.extract_tb(e.__traceback__)
    tests = os.path.dirname(__file__)
    short = lambda f: f"{'/'.join(f.filename.split(os.sep)[-2:])}:{f.lineno}"  # noqa: E731
    where = [short(f) for f in frames if f.filename.endswith("test_optim_contract.py")][-1:]
    if frames and os.path.dirname(frames[-1].filename) != tests:
        where.append(f"{short(frames[-1])} {frames[-1].name}")
    return f"{type(e).__name__}: {e} [{'; '.join(where)}]"


def per_input(s: Subject, body: Callable[[dict], None], inputs=None) -> None:
    """``body(kwargs)`` for each of torch's inputs; fails naming every input that failed."""
    inputs = s.inputs if inputs is None else inputs
    failed = []
    for desc, kwargs in inputs:
        try:
            body(copy.deepcopy(kwargs))
        except Exception as e:  # noqa: BLE001
            failed.append((desc, describe(e)))
    if failed:
        names = ", ".join(d for d, _ in failed)
        raise Described(
            f"fails for {len(failed)} of {len(inputs)} inputs ({names}); "
            f"[{failed[0][0]}] {failed[0][1]}"
        )


# ---- models, steps and comparisons ----------------------------------------------------------


def mlp(seed: int = 0) -> nn.Sequential:
    """A few Linear layers with odd sizes (nothing divides evenly across ranks)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 3), nn.Sigmoid())


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, generator=torch.Generator().manual_seed(seed))


def train_step(model: nn.Module, opt, x: torch.Tensor | None = None) -> None:
    opt.zero_grad()
    model(batch() if x is None else x).sum().backward()
    opt.step()


def params_of(model: nn.Module, named: bool = False) -> list:
    return list(model.named_parameters()) if named else list(model.parameters())


def torch_adamw(params, **kwargs) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, **copy.deepcopy(kwargs))


def clone_params(params: Iterable[torch.Tensor]) -> list[nn.Parameter]:
    """New trainable leaves with the same values, shapes and strides."""
    out = []
    for p in params:
        q = torch.empty_strided(p.size(), p.stride(), dtype=p.dtype, device=p.device)
        with torch.no_grad():
            q.copy_(p)
        out.append(nn.Parameter(q))
    return out


def snapshot(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.detach(), b.detach()
    if a.is_complex() and b.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise AssertionError(f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
    if not torch.equal(a, b):
        diff = (a.double() - b.double()).abs().max().item()
        raise AssertionError(f"{what}: not bitwise equal (max abs difference {diff:.3g})")


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal within torch's default tolerance for the dtype (``torch.testing.assert_close``)."""
    try:
        torch.testing.assert_close(a.detach(), b.detach())
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def same_params(ps: Iterable[torch.Tensor], qs: Iterable[torch.Tensor], what: str) -> None:
    ps, qs = list(ps), list(qs)
    if len(ps) != len(qs):
        raise AssertionError(f"{what}: {len(ps)} vs {len(qs)} parameters")
    for i, (p, q) in enumerate(zip(ps, qs)):
        same(p, q, f"{what}: parameter {i}")


def same_tree(a, b, what: str) -> None:
    """Equal nested dicts/lists with bitwise-equal tensors."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            raise AssertionError(f"{what}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}")
        for k in a:
            same_tree(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if type(a) is not type(b) or len(a) != len(b):
            raise AssertionError(f"{what}: {a!r} vs {b!r}")
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same(a, b, what)
    elif type(a) is not type(b) or a != b:
        raise AssertionError(f"{what}: {a!r} vs {b!r}")


def same_state(sub: dict, ref: dict, what: str) -> None:
    """The per-parameter state of state dict ``sub`` against torch's ``ref``: the same entries
    for every parameter torch has state for (the step by value); any further entry only for a
    parameter that never stepped."""
    for pid, entry in ref["state"].items():
        mine = sub["state"].get(pid)
        if mine is None:
            raise AssertionError(f"{what}: no state for parameter {pid}")
        if set(mine) != set(entry):
            raise AssertionError(f"{what}: state keys {sorted(mine)} vs torch's {sorted(entry)}")
        for key, value in entry.items():
            if key == "step":
                if float(mine[key]) != float(value):
                    raise AssertionError(f"{what}: step {float(mine[key])} vs {float(value)}")
            else:
                same(mine[key], value, f"{what}: state[{pid}][{key!r}]")
    for pid in set(sub["state"]) - set(ref["state"]):
        if float(sub["state"][pid].get("step", 0)) != 0:
            raise AssertionError(f"{what}: parameter {pid} has stepped state, torch has none")


def without_names(state_dict: dict) -> dict:
    out = copy.deepcopy(state_dict)
    for g in out["param_groups"]:
        g.pop("param_names", None)
    return out


def raised(fn: Callable, *args, **kwargs) -> BaseException | None:
    """What ``fn(*args, **kwargs)`` raises, or None."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return e
    return None


def same_error(mine: BaseException | None, torch_error: BaseException | None, what: str) -> None:
    """The subject raised what torch raised: same type, torch's message contained in ours."""
    if torch_error is None:
        raise AssertionError(f"{what}: torch.optim.AdamW raises nothing (broken check)")
    if mine is None:
        raise AssertionError(
            f"{what}: nothing raised; torch raises {type(torch_error).__name__}: {torch_error}"
        )
    if type(mine) is not type(torch_error) or str(torch_error) not in str(mine):
        raise AssertionError(
            f"{what}: raised {type(mine).__name__}: {mine}; "
            f"torch raises {type(torch_error).__name__}: {torch_error}"
        )


def against_torch(s: Subject, kwargs: dict, steps: int = 3, what: str = "") -> tuple:
    """The subject and torch AdamW, each on its own copy of ``mlp()``, ``steps`` steps on the
    same batch; parameters bitwise equal after every step. Returns both (model, optimizer)."""
    model = mlp()
    ref_model = copy.deepcopy(model)
    opt = s.make(model.parameters(), **kwargs)
    ref = torch_adamw(ref_model.parameters(), **kwargs)
    x = batch()
    for i in range(steps):
        train_step(model, opt, x)
        train_step(ref_model, ref, x)
        same_params(model.parameters(), ref_model.parameters(), f"{what}step {i}")
    return (model, opt), (ref_model, ref)
