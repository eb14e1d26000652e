"""ShardedAdamW against the optimizer contract PyTorch's own tests hold every optimizer to.

The checks below are modelled on what ``test/test_optim.py`` in PyTorch asserts for every
optimizer (written afresh), driven by the AdamW inputs of
``torch.testing._internal.common_optimizers.optim_db``. Every check runs for three subjects:

- ``torch.optim.AdamW`` on one process: the control (a failure here is a broken check);
- ``ShardedAdamW`` on one process without a process group (W=1);
- ``ShardedAdamW`` on each rank of 2 gloo processes (W=2), against ``torch.optim.AdamW`` on
  the same values with the same gradients on both ranks, bitwise.

Each subject's checks run in one fresh process, or one spawn of 2 ranks (module fixtures;
``tests/contract.py`` has the runner and the comparisons), and the tests at the end assert
per check. At W=2 the checks of the API surface run torch's default input alone
(``Subject.light``); the numeric ones run every input.

A check fails for ShardedAdamW wherever it passes for torch, except where ``ALLOW_LIST``
names it; there it asserts ShardedAdamW's documented behaviour instead, and still runs.
"""

from __future__ import annotations

import copy
import io
import itertools
import pickle
import re
import warnings
from collections.abc import Callable, Iterable

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from . import distributed
from .contract import (
    CHECKS,
    IMPLS,
    Described,
    Subject,
    against_torch,
    batch,
    check,
    clone_params,
    close,
    describe,
    mlp,
    params_of,
    per_input,
    raised,
    run_checks,
    run_in_fresh_process,
    same,
    same_error,
    same_params,
    same_state,
    same_tree,
    snapshot,
    torch_adamw,
    train_step,
    without_names,
)

ALLOW_LIST = {
    "differentiable_true": (
        "autograd through a collective step is out of scope: ShardedAdamW must refuse "
        "differentiable=True with a clear error (ValueError, RuntimeError or "
        "NotImplementedError naming the flag)"
    ),
    "duplicate_param_in_group": (
        "a parameter listed twice in one group is refused with a ValueError naming it (torch "
        "warns that this will become an error; AdamW would step such a parameter twice per "
        "step, and a parameter cannot live twice in a bucket)"
    ),
    "grad_not_consumed": (
        "a ShardedAdamW step consumes the sharded gradient: after step() p.grad is None, as "
        "documented (README, 'A step consumes the sharded gradient'); the gradient tensor "
        "handed in is still never written into and is used exactly as torch uses it"
    ),
}

NAMED = list(itertools.product((False, True), repeat=2))  # names on the saving/loading side


# ---- hooks ------------------------------------------------------------------------------------


@check
def check_step_pre_hook(s: Subject) -> None:
    model = mlp()
    opt = s.make(model.parameters())
    seen = []

    def hook(o, args, kwargs):
        seen.append((o, snapshot(model.parameters())))

    handle = opt.register_step_pre_hook(hook)
    for _ in range(2):
        before = snapshot(model.parameters())
        train_step(model, opt)
        assert seen and seen[-1][0] is opt, "the pre-hook did not run with the optimizer"
        same_params(seen[-1][1], before, "parameters the pre-hook saw vs before the step")
    assert len(seen) == 2, f"pre-hook ran {len(seen)} times in 2 steps"
    handle.remove()
    train_step(model, opt)
    assert len(seen) == 2, "the pre-hook still runs after handle.remove()"


@check
def check_step_post_hook(s: Subject) -> None:
    model = mlp()
    opt = s.make(model.parameters())
    seen = []

    def hook(o, args, kwargs):
        seen.append((o, snapshot(model.parameters())))

    handle = opt.register_step_post_hook(hook)
    for _ in range(2):
        train_step(model, opt)
        assert seen and seen[-1][0] is opt, "the post-hook did not run with the optimizer"
        same_params(seen[-1][1], model.parameters(), "parameters the post-hook saw vs after")
    assert len(seen) == 2, f"post-hook ran {len(seen)} times in 2 steps"
    handle.remove()
    train_step(model, opt)
    assert len(seen) == 2, "the post-hook still runs after handle.remove()"


@check
def check_step_hooks_order(s: Subject) -> None:
    """Global and per-optimizer step hooks run in torch's order, for this optimizer and for
    another one beside it, and not after removal."""
    model = mlp()
    opt = s.make(model.parameters())
    other_model = mlp(1)
    other = torch.optim.SGD(other_model.parameters(), lr=0.1)
    data: list[int] = []
    handles = [
        register_optimizer_step_pre_hook(lambda *a: data.append(0)),
        register_optimizer_step_post_hook(lambda *a: data.append(5)),
    ]
    try:
        for o in (opt, other):
            handles.append(o.register_step_pre_hook(lambda *a: data.append(1)))
            handles.append(o.register_step_post_hook(lambda *a: data.append(2)))
        train_step(model, opt)
        assert data == [0, 1, 2, 5], data
        train_step(other_model, other)
        train_step(model, opt)
        assert data == [0, 1, 2, 5] * 3, data
    finally:
        for h in handles:
            h.remove()
    train_step(model, opt)
    assert data == [0, 1, 2, 5] * 3, f"hooks ran after removal: {data}"


def _sd_pre_hook(opt) -> None:
    opt.state["test"] = 1


def _sd_post_hook(opt, state_dict: dict) -> dict:
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


def _one_param_opt(s: Subject, kwargs: dict):
    return s.make([nn.Parameter(torch.rand(2, 3))], **kwargs)


@check
def check_state_dict_pre_hook(s: Subject) -> None:
    """A pre-hook runs before the state is packed: what it puts into ``opt.state`` is in the
    state dict (torch keeps ``opt.state`` entries that are not parameters)."""

    def body(kwargs):
        opt = _one_param_opt(s, kwargs)
        ran = []
        opt.register_state_dict_pre_hook(lambda o: ran.append(o))
        opt.register_state_dict_pre_hook(_sd_pre_hook)
        sd = opt.state_dict()
        assert len(ran) == 1 and ran[0] is opt, f"the pre-hook ran {len(ran)} times"
        assert sd["state"].get("test") == 1, "opt.state['test'] set by the pre-hook is missing"

    per_input(s, body, s.light)


@check
def check_state_dict_post_hook(s: Subject) -> None:
    """A post-hook gets the state dict and what it returns is what state_dict() returns."""

    def body(kwargs):
        opt = _one_param_opt(s, kwargs)
        opt.register_state_dict_post_hook(_sd_post_hook)
        sd = opt.state_dict()
        assert sd.get("ran_state_dict_pre_hook") is False, "the post-hook's result is missing"

    per_input(s, body, s.light)


@check
def check_state_dict_pre_post_hook(s: Subject) -> None:
    def body(kwargs):
        opt = _one_param_opt(s, kwargs)
        opt.register_state_dict_pre_hook(_sd_pre_hook)
        opt.register_state_dict_post_hook(_sd_post_hook)
        sd = opt.state_dict()
        assert "test" not in sd["state"], "the post-hook did not run"
        assert sd.get("ran_state_dict_pre_hook") is True, "the post-hook did not see the pre's"

    per_input(s, body, s.light)


def _load_pre_hook1(opt, state_dict: dict) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(opt, state_dict: dict) -> dict:
    out = copy.deepcopy(state_dict)  # a hook may return a new state dict to load instead
    out["param_groups"][0]["lr"] = 0.003
    return out


def _load_post_hook(opt) -> None:
    opt.state["ran_load_state_dict_pre_hook2"] = opt.param_groups[0]["lr"] == 0.003
    opt.state["ran_load_state_dict_post_hook"] = True


@check
def check_load_state_dict_pre_hook(s: Subject) -> None:
    """Pre-hooks may edit or replace the state dict being loaded, in order (prepend first)."""

    def body(kwargs):
        opt = _one_param_opt(s, kwargs)
        sd = opt.state_dict()
        opt.register_load_state_dict_pre_hook(_load_pre_hook1)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.002, f"lr {opt.param_groups[0]['lr']}, not 0.002"
        opt.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
        opt.load_state_dict(sd)
        # hook2 runs first and returns a new dict, which hook1 then edits
        assert opt.param_groups[0]["lr"] == 0.002, f"lr {opt.param_groups[0]['lr']}, not 0.002"

    per_input(s, body, s.light)


@check
def check_load_state_dict_post_hook(s: Subject) -> None:
    def body(kwargs):
        opt = _one_param_opt(s, kwargs)
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state.get("ran_load_state_dict_post_hook") is True, "post-hook did not run"
        assert opt.state.get("ran_load_state_dict_pre_hook2") is False

    per_input(s, body, s.light)


@check
def check_load_state_dict_pre_post_hook(s: Subject) -> None:
    def body(kwargs):
        opt = _one_param_opt(s, kwargs)
        opt.register_load_state_dict_pre_hook(_load_pre_hook2)
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state.get("ran_load_state_dict_post_hook") is True, "post-hook did not run"
        assert opt.state.get("ran_load_state_dict_pre_hook2") is True, "pre-hook's lr not loaded"

    per_input(s, body, s.light)


# ---- state dicts ------------------------------------------------------------------------------


@check
def check_state_dict_roundtrip(s: Subject) -> None:
    """Save after 10 steps, load into a fresh optimizer over a deep copy of the model, go on
    10 steps: the same bits as the uninterrupted optimizer at every step, the loaded dict
    untouched by the load, and equal state dicts at the end (deterministic), with named
    parameters on either side or both."""

    def body(kwargs):
        x = batch()
        for named0, named1 in NAMED if s.world == 1 else ((False, False), (True, True)):
            what = f"names {named0}/{named1}"
            model = mlp()
            opt = s.make(params_of(model, named0), **kwargs)
            for _ in range(10):
                train_step(model, opt, x)
            fresh = copy.deepcopy(model)
            fresh_opt = s.make(params_of(fresh, named1), **kwargs)
            sd = copy.deepcopy(opt.state_dict())
            kept = copy.deepcopy(sd)
            fresh_opt.load_state_dict(sd)
            same_tree(sd, kept, f"{what}: the state dict after load_state_dict")
            for i in range(10):
                train_step(model, opt, x)
                train_step(fresh, fresh_opt, x)
                same_params(fresh.parameters(), model.parameters(), f"{what}: step {i} after")
            same_tree(
                without_names(fresh_opt.state_dict()),
                without_names(opt.state_dict()),
                f"{what}: state_dict() resumed vs uninterrupted",
            )

    per_input(s, body)


@check
def check_state_dict_repeated_params(s: Subject) -> None:
    """Parameters listed twice are packed by their first index, as torch does (#36831)."""

    def body(kwargs):
        model = mlp()
        opt = s.make(model.parameters(), **kwargs)
        for _ in range(3):
            train_step(model, opt)
        fresh = copy.deepcopy(model)
        fresh_opt = s.make(fresh.parameters(), **kwargs)
        fresh_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        fresh_opt.param_groups.extend(fresh_opt.param_groups)
        same_tree(
            without_names(fresh_opt.state_dict())["param_groups"][-1],
            without_names(opt.state_dict())["param_groups"][-1],
            "last param group with the groups repeated",
        )

    per_input(s, body, s.light)


@check
def check_named_state_dict_load(s: Subject) -> None:
    """A state dict saved with or without ``named_parameters()`` loads into an optimizer built
    either way; ``param_names`` are kept when either side has them; the next step equals the
    saving optimizer's."""

    def body(kwargs):
        x = batch()
        for named0, named1 in NAMED:
            what = f"names {named0}/{named1}"
            model = mlp()
            opt = s.make(params_of(model, named0), **kwargs)
            for _ in range(3):
                train_step(model, opt, x)
            sd = copy.deepcopy(opt.state_dict())
            twin = copy.deepcopy(model)
            opt2 = s.make(params_of(twin, named1), **kwargs)
            opt2.load_state_dict(sd)
            train_step(model, opt, x)
            train_step(twin, opt2, x)
            same_params(twin.parameters(), model.parameters(), f"{what}: step after loading")
            if named0 or named1:
                names = [n for n, _ in model.named_parameters()]
                got = opt2.state_dict()["param_groups"][0].get("param_names")
                assert got == names, f"{what}: param_names {got}, expected {names}"

    per_input(s, body, s.light)


def _loaded_then_stepped(s: Subject, kwargs: dict, edit: Callable[[dict], None]) -> None:
    """3 steps; reload the optimizer's own state dict after ``edit``; one more step. The same
    is done to torch AdamW; parameters and hyperparameters must match it."""
    (model, opt), (ref_model, ref) = against_torch(s, kwargs, steps=3)
    for o in (opt, ref):
        sd = copy.deepcopy(o.state_dict())
        edit(sd)
        o.load_state_dict(sd)
    train_step(model, opt)
    train_step(ref_model, ref)
    same_params(model.parameters(), ref_model.parameters(), "step after the load")
    strip = lambda g: {k: v for k, v in g.items() if k not in ("params", "param_names")}  # noqa: E731
    same_tree(strip(opt.param_groups[0]), strip(ref.param_groups[0]), "param group after load")


@check
def check_load_older_state_dict(s: Subject) -> None:
    """A state dict from before the flags torch added later (``not_og_supported_flags``)
    loads and training goes on as it does for torch."""
    flags = s.info.not_og_supported_flags

    def edit(sd):
        for g in sd["param_groups"]:
            for flag in flags:
                g.pop(flag, None)

    per_input(s, lambda kwargs: _loaded_then_stepped(s, kwargs, edit))


@check
def check_load_nontensor_step(s: Subject) -> None:
    """``step`` saved as a Python number (older torch) loads and training goes on."""

    def edit(sd):
        for entry in sd["state"].values():
            if torch.is_tensor(entry.get("step")):
                entry["step"] = entry["step"].item()

    per_input(s, lambda kwargs: _loaded_then_stepped(s, kwargs, edit), s.light)


@check
def check_state_dict_save_load(s: Subject) -> None:
    """The state dict survives ``torch.save`` and ``torch.load`` (also ``weights_only``)."""

    def body(kwargs):
        for named in (False, True):
            model = mlp()
            opt = s.make(params_of(model, named), **kwargs)
            for _ in range(3):
                train_step(model, opt)
            sd = opt.state_dict()
            buf = io.BytesIO()
            torch.save(sd, buf)
            for weights_only in (False, True):
                buf.seek(0)
                loaded = torch.load(buf, weights_only=weights_only)
                same_tree(loaded, sd, f"named={named} weights_only={weights_only}")

    per_input(s, body, s.light)


# ---- copies and printing --------------------------------------------------------------------


def _copied_then_stepped(s: Subject, kwargs: dict, copier: Callable) -> None:
    (model, opt), (ref_model, ref) = against_torch(s, kwargs, steps=3)
    model2, opt2 = copier((model, opt))
    public = lambda o: {k for k in vars(o) if not k.startswith("_")}  # noqa: E731
    assert public(opt2) == public(opt), f"public attributes {public(opt2)} vs {public(opt)}"
    copied = opt2.param_groups[0]["params"]
    assert all(p is q for p, q in zip(copied, model2.parameters())), "copy's params not model's"
    for i in range(3):
        train_step(model2, opt2)
        train_step(model, opt)
        train_step(ref_model, ref)
        same_params(model2.parameters(), model.parameters(), f"copy vs original, step {i}")
        same_params(model.parameters(), ref_model.parameters(), f"original vs torch, step {i}")


@check
def check_deepcopy(s: Subject) -> None:
    """``copy.deepcopy((model, opt))`` after 3 steps: the copy keeps the public attributes
    and trains on exactly like the original, which is not disturbed."""
    per_input(s, lambda kwargs: _copied_then_stepped(s, kwargs, copy.deepcopy), s.light)


@check
def check_pickle(s: Subject) -> None:
    """The same through a pickle round trip."""
    per_input(s, lambda kwargs: _copied_then_stepped(s, kwargs, _pickle_roundtrip), s.light)


def _pickle_roundtrip(obj):
    return pickle.loads(pickle.dumps(obj))


@check
def check_repr(s: Subject) -> None:
    def body(kwargs):
        opt = s.make(mlp().parameters(), **kwargs)
        text = repr(opt)
        assert text.startswith(f"{s.cls.__name__} ("), text[:80]
        for i, g in enumerate(opt.param_groups):
            assert f"Parameter Group {i}\n" in text, text
            for key in sorted(g):
                if key != "params":
                    assert f"    {key}: {g[key]}\n" in text, f"{key!r} missing from {text}"

    per_input(s, body, s.light)


# ---- steps ------------------------------------------------------------------------------------


@check
def check_goes_right_direction(s: Subject) -> None:
    """20 for-loop steps lower the loss (raise it with ``maximize``)."""

    def body(kwargs):
        g = torch.Generator().manual_seed(2)
        weight = nn.Parameter(torch.randn(10, 5, generator=g))
        bias = nn.Parameter(torch.randn(10, generator=g))
        x = torch.randn(5, generator=g)
        opt = s.make([weight, bias], **kwargs, foreach=False)

        def closure():
            opt.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            closure()
            opt.step()
        final = closure().item()
        if kwargs.get("maximize"):
            assert final > initial, f"loss {initial} -> {final} (maximize)"
        else:
            assert final < initial, f"loss {initial} -> {final}"

    per_input(s, body)


@check
def check_step_closure(s: Subject) -> None:
    """``step(closure)`` runs the closure once, with grad enabled, and returns its loss."""

    def body(kwargs):
        model = mlp()
        ref_model = copy.deepcopy(model)
        opt = s.make(model.parameters(), **kwargs)
        ref = torch_adamw(ref_model.parameters(), **kwargs)
        x = batch()
        calls = []

        def closure(m, o):
            calls.append(torch.is_grad_enabled())
            o.zero_grad()
            loss = m(x).sum()
            loss.backward()
            return loss

        for i in range(3):
            loss = opt.step(lambda: closure(model, opt))
            ref_loss = ref.step(lambda: closure(ref_model, ref))
            same(loss, ref_loss, f"loss returned by step {i}")
            same_params(model.parameters(), ref_model.parameters(), f"step {i}")
        assert calls == [True] * 6, f"closure calls (grad enabled): {calls}"

    per_input(s, body, s.light)


@check
def check_zero_grads_step_is_noop(s: Subject) -> None:
    """All-zero gradients without weight decay leave the parameters as they are; with the
    input's weight decay the step equals torch's."""

    def body(kwargs):
        kwargs["lr"] = 1e-5
        if kwargs.get("weight_decay", 0) == 0:  # torch skips the decaying inputs here
            p = nn.Parameter(torch.randn(5, 1))
            before = p.detach().clone()
            opt = s.make([p], **{**kwargs, "weight_decay": 0.0})
            for _ in range(3):
                p.grad = torch.zeros_like(p)
                opt.step(lambda: torch.tensor([1.0]))
            same(p, before, "parameter after steps with zero gradients")
        model = mlp()
        ref_model = copy.deepcopy(model)
        opt = s.make(model.parameters(), **kwargs)
        ref = torch_adamw(ref_model.parameters(), **kwargs)
        for _ in range(2):
            for m, o in ((model, opt), (ref_model, ref)):
                for p in m.parameters():
                    p.grad = torch.zeros_like(p)
                o.step()
        same_params(model.parameters(), ref_model.parameters(), "zero gradients, decaying")
        same_state(opt.state_dict(), ref.state_dict(), "state after zero-gradient steps")

    per_input(s, body, s.light)


@check
def check_no_grad_step_is_noop(s: Subject) -> None:
    """A step where no parameter has a gradient changes nothing and counts no step; where
    only some have one, only those change, as for torch."""

    def body(kwargs):
        frozen = [torch.randn(2, 3) for _ in range(2)]  # requires_grad=False
        before = snapshot(frozen)
        opt = s.make(frozen, **kwargs)
        loss = opt.step(lambda: torch.tensor([1.0]))
        assert torch.equal(loss, torch.tensor([1.0])), f"step returned {loss}"
        same_params(frozen, before, "parameters without requires_grad")

        model = mlp()
        ref_model = copy.deepcopy(model)
        opt = s.make(model.parameters(), **kwargs)
        ref = torch_adamw(ref_model.parameters(), **kwargs)
        train_step(model, opt)  # one real step first, so that there is state
        train_step(ref_model, ref)
        before = snapshot(model.parameters())
        opt.zero_grad()
        opt.step()
        same_params(model.parameters(), before, "step with no gradients")
        ref.zero_grad()
        ref.step()
        same_state(opt.state_dict(), ref.state_dict(), "state after a step with no gradients")

        g = torch.Generator().manual_seed(5)
        grad = torch.randn(model[0].weight.shape, generator=g)
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            m[0].weight.grad = grad.clone()
            o.step()
        same_params(model.parameters(), ref_model.parameters(), "one parameter with a gradient")
        same_state(opt.state_dict(), ref.state_dict(), "state after a partial step")

    per_input(s, body, s.light)


@check
def check_grad_not_consumed(s: Subject) -> None:
    """torch: ``step()`` neither replaces ``p.grad`` nor writes into it.
    ShardedAdamW (allow-listed): a step consumes the gradient, so ``p.grad`` is None after it
    (documented); the tensor handed in is still not written into, the step used it exactly as
    torch does, and a second step without a new gradient changes nothing."""

    def body(kwargs):
        p = nn.Parameter(torch.randn(5, 1))
        q = nn.Parameter(p.detach().clone())
        opt = s.make([p], **kwargs)
        ref = torch_adamw([q], **kwargs)
        grad = torch.rand(5, 1)
        values, version = grad.clone(), grad._version
        p.grad, q.grad = grad, grad.clone()
        if not s.allowed("grad_not_consumed"):
            for i in range(5):
                opt.step()
                ref.step()
                assert p.grad is grad, f"step {i} replaced p.grad"
                assert grad._version == version, f"step {i} wrote into p.grad"
                same(p, q, f"step {i}")
            return
        opt.step()
        ref.step()
        assert p.grad is None, "p.grad is not None after a ShardedAdamW step"
        assert grad._version == version, "the gradient handed in was written into"
        same(grad, values, "the gradient handed in")
        same(p, q, "step with the gradient vs torch")
        opt.step()
        same(p, q, "second step without a new gradient")

    per_input(s, body, s.light)


@check
def check_differentiable_true(s: Subject) -> None:
    """torch: ``differentiable=True`` makes the step part of the autograd graph.
    ShardedAdamW (allow-listed): it refuses ``differentiable=True`` with an error that names it."""
    if s.allowed("differentiable_true"):
        p = nn.Parameter(torch.randn(3, 4))
        err = raised(s.make, [p], differentiable=True)
        if err is None:
            raise AssertionError("differentiable=True was accepted; it must be refused")
        if not isinstance(err, ValueError | RuntimeError | NotImplementedError):
            raise AssertionError(f"not a clear refusal: {describe(err)}")
        assert "differentiable" in str(err), f"the error does not name the flag: {err}"
        return
    leaf = torch.randn(3, 4, requires_grad=True)
    p = leaf.clone()  # a non-leaf, so that the update can be differentiated through
    opt = s.make([p], differentiable=True)
    p.grad = torch.randn(3, 4)
    opt.step()
    assert p.grad_fn is not None, "the updated parameter is not part of the graph"
    p.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), "no gradient through step"


@check
def check_non_empty_state(s: Subject) -> None:
    model = mlp()
    opt = s.make(model.parameters())
    train_step(model, opt)
    assert all(len(st) > 0 for st in opt.state.values()), "empty state after a step"


# ---- construction ------------------------------------------------------------------------------


@check
def check_constructor_errors_optim_db(s: Subject) -> None:
    """torch's error inputs for AdamW: the same error type and message (or warning)."""
    failed = []
    inputs = s.info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    for ei in inputs:
        oi = ei.optimizer_error_input
        what = oi.desc
        try:
            if "cannot have duplicate" in what and s.allowed("duplicate_param_in_group"):
                err = raised(s.make, oi.params, **oi.kwargs)
                assert isinstance(err, ValueError) and "appears twice" in str(err), describe(err)
                continue
            if issubclass(ei.error_type, Warning):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    opt = s.make(oi.params, **oi.kwargs)
                    if ei.error_on.name == "STEP_ERROR":
                        opt.step()
                hit = [w for w in caught if issubclass(w.category, ei.error_type)]
                assert any(re.search(ei.error_regex, str(w.message)) for w in hit), (
                    f"no {ei.error_type.__name__} matching {ei.error_regex!r}"
                )
                continue
            if ei.error_on.name == "STEP_ERROR":
                opt = s.make(oi.params, **oi.kwargs)
                err = raised(opt.step)
            else:
                err = raised(s.make, oi.params, **oi.kwargs)
            if not isinstance(err, ei.error_type) or not re.search(ei.error_regex, str(err)):
                got = "nothing" if err is None else f"{type(err).__name__}: {err}"
                raise AssertionError(
                    f"raised {got}; torch raises {ei.error_type.__name__} "
                    f"matching {ei.error_regex!r}"
                )
        except Exception as e:  # noqa: BLE001
            failed.append(f"[{what}] {describe(e)}")
    if failed:
        raise Described(f"{len(failed)} of {len(inputs)} error inputs: " + " | ".join(failed))


def _fresh_param() -> nn.Parameter:
    return nn.Parameter(torch.randn(3, 2))


CONSTRUCTOR_ERRORS = {
    "lr=-1": (True, dict(lr=-1.0)),
    "lr=nan": (True, dict(lr=float("nan"))),
    "eps=-1": (True, dict(eps=-1.0)),
    "betas[0]=1": (True, dict(betas=(1.0, 0.999))),
    "betas[0]=-0.1": (True, dict(betas=(-0.1, 0.999))),
    "betas[1]=1": (True, dict(betas=(0.9, 1.0))),
    "weight_decay=-1": (True, dict(weight_decay=-1.0)),
    "lr tensor of 2 elements": (True, dict(lr=torch.tensor([1e-3, 1e-3]))),
    "fused and foreach": (True, dict(fused=True, foreach=True)),
    # torch checks the hyperparameters before it looks at the parameters
    "lr=-1, no parameters": (False, dict(lr=-1.0)),
    "eps=-1, no parameters": (False, dict(eps=-1.0)),
    "betas[0]=1, no parameters": (False, dict(betas=(1.0, 0.999))),
    "no parameters": (False, {}),
}


@check
def check_constructor_errors(s: Subject) -> None:
    failed = []
    for what, (with_params, kwargs) in CONSTRUCTOR_ERRORS.items():
        params = [_fresh_param()] if with_params else []
        ref = raised(torch_adamw, params, **kwargs)
        params = [_fresh_param()] if with_params else []
        mine = raised(s.make, params, **copy.deepcopy(kwargs))
        try:
            same_error(mine, ref, what)
        except AssertionError as e:
            failed.append(str(e))
    if failed:
        raise Described(f"{len(failed)} of {len(CONSTRUCTOR_ERRORS)}: " + " | ".join(failed))


@check
def check_tensor_betas(s: Subject) -> None:
    """Betas given as tensors: torch's errors for a float/tensor mix and for foreach, and the
    same bits as torch where it accepts them."""
    t = torch.tensor
    errors = {
        "float and tensor": dict(betas=(0.9, t(0.99))),
        "tensor and float": dict(betas=(t(0.9), 0.99)),
        "tensors with foreach": dict(betas=(t(0.9), t(0.99)), foreach=True),
    }
    for what, kwargs in errors.items():
        ref = raised(torch_adamw, [_fresh_param()], **kwargs)
        same_error(raised(s.make, [_fresh_param()], **copy.deepcopy(kwargs)), ref, what)

    def body(kwargs):
        for impl in ("default", "forloop"):
            k = {**kwargs, "betas": (t(0.9), t(0.999)), **IMPLS.get(impl, {})}
            against_torch(s, k, steps=4, what=f"{impl}: ")

    per_input(s, body, s.light)


@check
def check_flags_false_accepted(s: Subject) -> None:
    """torch's base configuration passes every implementation flag as False explicitly."""

    def body(kwargs):
        flags = dict(foreach=False, fused=False, differentiable=False, capturable=False)
        against_torch(s, {**kwargs, **flags}, steps=3)

    per_input(s, body, s.light)


@check
def check_add_param_group(s: Subject) -> None:
    """A group added after some steps gets the defaults torch gives it and trains like
    torch's; adding a parameter twice raises torch's error and changes nothing."""

    def body(kwargs):
        model = mlp()
        ref_model = copy.deepcopy(model)
        opt = s.make(model[0].parameters(), **kwargs)
        ref = torch_adamw(ref_model[0].parameters(), **kwargs)
        x = batch()
        for i in range(5):
            if i == 2:
                for m, o in ((model, opt), (ref_model, ref)):
                    o.add_param_group({"params": m[2].parameters(), "lr": 0.02, "weight_decay": 0})
                strip = lambda g: {k: v for k, v in g.items() if k != "params"}  # noqa: E731
                same_tree(strip(opt.param_groups[1]), strip(ref.param_groups[1]), "added group")
            train_step(model, opt, x)
            train_step(ref_model, ref, x)
            same_params(model.parameters(), ref_model.parameters(), f"step {i}")
        err = raised(opt.add_param_group, {"params": [model[0].weight]})
        ref_err = raised(ref.add_param_group, {"params": [ref_model[0].weight]})
        same_error(err, ref_err, "a parameter added twice")
        assert len(opt.param_groups) == 2, f"{len(opt.param_groups)} groups after the failed add"
        train_step(model, opt, x)
        train_step(ref_model, ref, x)
        same_params(model.parameters(), ref_model.parameters(), "step after the failed add")

    per_input(s, body, s.light)


@check
def check_param_groups_lr(s: Subject) -> None:
    """Per-group lr: a group at the outer lr of 1e-28 does not move, the other trains; the
    same bits as torch."""

    def body(kwargs):
        if not kwargs.get("lr"):
            kwargs["lr"] = 1e-3
        g = torch.Generator().manual_seed(4)
        weight = nn.Parameter(torch.randn(10, 5, generator=g))
        bias = nn.Parameter(torch.randn(10, generator=g))
        other = nn.Parameter(torch.randn(2, 2, generator=g))
        x = torch.randn(5, generator=g)
        refs = clone_params([weight, bias, other])
        other_before = other.detach().clone()
        opt = s.make([dict(params=[weight, bias], **kwargs), dict(params=[other])], lr=1e-28)
        ref = torch_adamw(
            [dict(params=refs[:2], **copy.deepcopy(kwargs)), dict(params=refs[2:])], lr=1e-28
        )
        initial = (weight.mv(x) + bias).pow(2).sum().item()
        for i in range(20):
            noise = torch.rand(2, 2, generator=g)
            for (w, b, o), op in (((weight, bias, other), opt), (refs, ref)):
                op.zero_grad()
                (w.mv(x) + b).pow(2).sum().backward()
                o.grad = noise.clone()
                op.step()
            same_params([weight, bias, other], refs, f"step {i}")
        final = (weight.mv(x) + bias).pow(2).sum().item()
        assert (final > initial) if kwargs.get("maximize") else (final < initial), (
            f"loss {initial} -> {final}"
        )
        same(other, other_before, "parameter of the lr=1e-28 group")

    per_input(s, body, s.light)


@check
def check_tensor_lr(s: Subject) -> None:
    """lr as a 1-element tensor of 0, 1 or 2 dims, with each implementation: torch's error
    where torch refuses it (foreach), else the same bits as torch with the same tensor, and
    close to the run with the float lr."""

    def body(kwargs):
        kwargs.pop("lr", None)
        for ndim, impl in itertools.product((0, 1, 2), IMPLS):
            what = f"{ndim}-d tensor lr, {impl}"
            k = {**kwargs, **IMPLS[impl]}
            lr = torch.tensor(1e-3).reshape([1] * ndim)
            ref_err = raised(torch_adamw, [_fresh_param()], lr=lr.clone(), **k)
            if ref_err is not None:
                mine = raised(s.make, [_fresh_param()], lr=lr.clone(), **k)
                same_error(mine, ref_err, what)
                continue
            (model, _), _ = against_torch(s, {**k, "lr": lr}, steps=4, what=f"{what}: ")
            (floated, _), _ = against_torch(s, {**k, "lr": 1e-3}, steps=4, what=f"{what}: ")
            for p, q in zip(model.parameters(), floated.parameters()):
                close(p, q, f"{what} vs float lr")

    per_input(s, body, s.light)


# ---- parameters of every kind -----------------------------------------------------------------


@check
def check_complex_params(s: Subject) -> None:
    """Complex parameters (with a real one among them) step exactly like their
    ``torch.view_as_real`` views, in the subject and against torch AdamW on those views; for
    the for-loop and foreach implementations (torch's fused kernels take no complex)."""

    def body(kwargs):
        for impl in ("forloop", "foreach"):
            k = {**kwargs, **IMPLS[impl]}
            g = torch.Generator().manual_seed(3)
            cplx = [
                nn.Parameter(torch.randn(10, 5, dtype=torch.complex64, generator=g)),
                nn.Parameter(torch.randn(7, dtype=torch.complex64, generator=g)),
                nn.Parameter(torch.randn(10, 5, generator=g)),
            ]
            as_real = lambda ps: [torch.view_as_real(p) if p.is_complex() else p for p in ps]  # noqa: E731
            real = clone_params(as_real([p.detach() for p in cplx]))
            ref_real = clone_params(real)
            opt_c = s.make(cplx, **k)
            opt_r = s.make(real, **k)
            ref = torch_adamw(ref_real, **k)
            for i in range(3):
                grads = [torch.randn(r.shape, generator=g) for r in real]
                for p, gr in zip(cplx, grads):
                    p.grad = torch.view_as_complex(gr.clone()) if p.is_complex() else gr.clone()
                for ps in (real, ref_real):
                    for p, gr in zip(ps, grads):
                        p.grad = gr.clone()
                for o in (opt_c, opt_r, ref):
                    o.step()
                same_params(as_real(cplx), real, f"{impl} step {i}: complex vs real views")
                same_params(as_real(cplx), ref_real, f"{impl} step {i}: vs torch on real views")

    per_input(s, body, s.light)


def _strided_params() -> list[nn.Parameter]:
    """A channels_last conv weight, a transposed matrix, a strided slice, a plain vector."""
    g = torch.Generator().manual_seed(6)
    conv = torch.randn(5, 3, 3, 3, generator=g).to(memory_format=torch.channels_last)
    return [
        nn.Parameter(conv),
        nn.Parameter(torch.randn(7, 5, generator=g).t()),
        nn.Parameter(torch.randn(10, 5, 2, generator=g)[..., 0]),
        nn.Parameter(torch.randn(9, generator=g)),
    ]


def _strided_loss(params) -> torch.Tensor:
    return sum(((p - 0.5) ** 2).sum() for p in params)


def _train_strided(s: Subject, kwargs: dict) -> tuple[list, list]:
    params = _strided_params()
    refs = clone_params(params)
    opt = s.make(params, **kwargs)
    ref = torch_adamw(refs, **kwargs)
    initial = _strided_loss(params).item()
    for i in range(5):
        for ps, o in ((params, opt), (refs, ref)):
            o.zero_grad()
            _strided_loss(ps).backward()
            o.step()
        same_params(params, refs, f"step {i}")
    final = _strided_loss(params).item()
    assert (final > initial) if kwargs.get("maximize") else (final < initial), (
        f"loss {initial} -> {final}"
    )
    return params, refs


@check
def check_noncontiguous_params(s: Subject) -> None:
    """Non-contiguous parameters train, with the same bits as torch."""
    per_input(s, lambda kwargs: _train_strided(s, kwargs))


@check
def check_noncontiguous_layout_kept(s: Subject) -> None:
    """Non-contiguous parameters keep their strides (memory format), as under torch AdamW."""

    def body(kwargs):
        strides = [p.stride() for p in _strided_params()]
        params, _ = _train_strided(s, kwargs)
        got = [p.stride() for p in params]
        assert got == strides, f"strides {got}, were {strides}"
        assert params[0].is_contiguous(memory_format=torch.channels_last), "not channels_last"

    per_input(s, body, s.light)


@check
def check_meta_to_empty(s: Subject) -> None:
    """Meta-device parameters materialised with ``module.to_empty(device="cpu")``.

    torch's order (test_fused_error_on_params_on_meta): the optimizer is built over the meta
    parameters; ``to_empty`` gives the module new parameter tensors, so the optimizer keeps
    the meta ones and a step after it runs and changes nothing of the module. The usual
    order: materialise, load the weights, build the optimizer, train: torch's bits."""

    def body(kwargs):
        weights = mlp()
        with torch.device("meta"):
            model = mlp()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ShardedAdamW warns that this order trains nothing
            opt = s.make(model.parameters(), **kwargs)
        opt.zero_grad(set_to_none=True)
        model.to_empty(device="cpu")
        model.load_state_dict(weights.state_dict())
        for p in model.parameters():
            p.grad = torch.rand_like(p)
        opt.step()
        same_params(model.parameters(), weights.parameters(), "module after the meta step")

        with torch.device("meta"):
            model = mlp()
        model.to_empty(device="cpu")
        model.load_state_dict(weights.state_dict())
        opt = s.make(model.parameters(), **kwargs)
        ref_model = copy.deepcopy(weights)
        ref = torch_adamw(ref_model.parameters(), **kwargs)
        x = batch()
        for i in range(3):
            train_step(model, opt, x)
            train_step(ref_model, ref, x)
            same_params(model.parameters(), ref_model.parameters(), f"step {i}")

    per_input(s, body, s.light)


# ---- implementations and zero_grad -------------------------------------------------------------


def _derived_run(make: Callable, kwargs: dict) -> tuple[list, dict]:
    """torch's implementation-parity scenario: 7 iterations; no backward at the third (no
    gradients: a no-op), the last Linear frozen for two iterations; a scalar parameter that
    never gets a gradient. Returns the parameters after each step and the final state dict."""
    model = mlp(1)
    extra = nn.Parameter(torch.randn(()))
    extra.grad = torch.rand_like(extra)
    params = [*model.parameters(), extra]
    opt = make(params, **kwargs)
    x = batch()
    history = []
    for i in range(7):
        opt.zero_grad()
        if i == 3:
            model[2].requires_grad_(False)
        if i == 5:
            model[2].requires_grad_(True)
        if i != 2:
            model(x).sum().backward()
        opt.step()
        history.append(snapshot(params))
    return history, opt.state_dict()


@check
def check_matches_torch(s: Subject) -> None:
    """The for-loop, foreach and fused implementations each give torch AdamW's bits with
    the same implementation: parameters at every step and the final state."""

    def body(kwargs):
        for impl, flag in IMPLS.items():
            k = {**kwargs, **flag}
            mine, mine_sd = _derived_run(s.make, k)
            ref, ref_sd = _derived_run(torch_adamw, k)
            for i, (a, b) in enumerate(zip(mine, ref)):
                same_params(a, b, f"{impl} step {i}")
            same_state(mine_sd, ref_sd, f"{impl} state")

    per_input(s, body)


@check
def check_impls_agree(s: Subject) -> None:
    """foreach and fused agree with the for-loop within float32 tolerance, as torch checks."""

    def body(kwargs):
        runs = {impl: _derived_run(s.make, {**kwargs, **flag}) for impl, flag in IMPLS.items()}
        base, base_sd = runs["forloop"]
        for impl in ("foreach", "fused"):
            hist, sd = runs[impl]
            for i, (a, b) in enumerate(zip(hist, base)):
                for j, (p, q) in enumerate(zip(a, b)):
                    close(p, q, f"{impl} vs forloop, step {i} param {j}")
            for pid, entry in base_sd["state"].items():
                for key, value in entry.items():
                    mine = torch.as_tensor(sd["state"][pid][key]).float()
                    close(mine, torch.as_tensor(value).float(), f"{impl} vs forloop, {key}")

    per_input(s, body, s.light)


def _pair(s: Subject, kwargs: dict):
    model = mlp()
    ref_model = copy.deepcopy(model)
    opt = s.make(model.parameters(), **kwargs)
    ref = torch_adamw(ref_model.parameters(), **kwargs)
    x = batch()
    for _ in range(2):
        train_step(model, opt, x)
        train_step(ref_model, ref, x)
    return model, opt, ref_model, ref, x


def _random_grads(models: Iterable[nn.Module], seed: int) -> None:
    for m in models:
        g = torch.Generator().manual_seed(seed)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g)


@check
def check_zero_grad_set_to_none_true(s: Subject) -> None:
    """``zero_grad()`` drops the gradients: the next step changes nothing, whether they were
    set by hand or by backward."""

    def body(kwargs):
        model, opt, ref_model, ref, x = _pair(s, kwargs)
        before = snapshot(model.parameters())
        _random_grads((model, ref_model), 7)
        opt.zero_grad()
        ref.zero_grad()
        assert all(p.grad is None for p in model.parameters()), "p.grad left after zero_grad()"
        opt.step()
        same_params(model.parameters(), before, "step after gradients set by hand")
        for m, o in ((model, opt), (ref_model, ref)):
            m(x).sum().backward()
            o.zero_grad()
            o.step()
        same_params(model.parameters(), before, "step after backward and zero_grad()")
        ref.step()
        same_params(model.parameters(), ref_model.parameters(), "vs torch")

    per_input(s, body, s.light)


@check
def check_zero_grad_set_to_none_false(s: Subject) -> None:
    """``zero_grad(set_to_none=False)`` zeroes the gradients in place; the next step then
    steps every parameter with a zero gradient (decay, step count), as torch does, whether
    the gradients were set by hand or by backward."""

    def body(kwargs):
        model, opt, ref_model, ref, x = _pair(s, kwargs)
        _random_grads((model, ref_model), 7)
        grads = [p.grad for p in model.parameters()]
        opt.zero_grad(set_to_none=False)
        ref.zero_grad(set_to_none=False)
        for p, g in zip(model.parameters(), grads):
            assert p.grad is g, "zero_grad(set_to_none=False) replaced p.grad"
            assert not p.grad.any(), "zero_grad(set_to_none=False) left a non-zero gradient"
        opt.step()
        ref.step()
        same_params(model.parameters(), ref_model.parameters(), "after gradients set by hand")
        same_state(opt.state_dict(), ref.state_dict(), "state after gradients set by hand")
        for m, o in ((model, opt), (ref_model, ref)):
            m(x).sum().backward()
            o.zero_grad(set_to_none=False)
            o.step()
        same_params(model.parameters(), ref_model.parameters(), "after backward")
        same_state(opt.state_dict(), ref.state_dict(), "state after backward")

    per_input(s, body, s.light)


# ---- running the checks ------------------------------------------------------------------------


def run_single_process(allow: Iterable[str]) -> dict[str, dict]:
    """The control and ShardedAdamW on one process without a process group (W=1)."""
    return {"torch": run_checks("torch"), "sharded": run_checks("sharded", allow)}


def run_rank(rank: int, world_size: int, allow: Iterable[str]) -> dict[str, dict]:
    """ShardedAdamW on this rank of a gloo group of ``world_size``."""
    return run_checks("sharded", allow, world_size)


@pytest.fixture(scope="module")
def single_process() -> dict:
    return run_in_fresh_process(run_single_process, tuple(ALLOW_LIST))


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return distributed.run(run_rank, 2, tuple(ALLOW_LIST))


def _assert_passed(outcome: dict, who: str, name: str) -> None:
    assert outcome["error"] is None, f"{who}, {name}: {outcome['error']}"


def test_allow_list_names_checks_that_run():
    assert set(ALLOW_LIST) == {
        "differentiable_true",
        "grad_not_consumed",
        "duplicate_param_in_group",
    }
    assert set(ALLOW_LIST) - {"duplicate_param_in_group"} <= set(CHECKS)  # that one: a sub-case


@pytest.mark.parametrize("name", list(CHECKS))
def test_torch_adamw(single_process, name):
    _assert_passed(single_process["torch"][name], "torch.optim.AdamW (control)", name)


@pytest.mark.parametrize("name", list(CHECKS))
def test_sharded_adamw_w1(single_process, name):
    _assert_passed(single_process["sharded"][name], "ShardedAdamW W=1", name)


@pytest.mark.parametrize("name", list(CHECKS))
def test_sharded_adamw_w2(two_ranks, name):
    for rank, outcomes in enumerate(two_ranks):
        _assert_passed(outcomes[name], f"ShardedAdamW W=2 rank {rank}", name)
