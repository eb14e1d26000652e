"""Per-parameter reads and writes of the averaged gradient, which lives in the shards.

After a synchronising backward ``p.grad`` is None (standalone) or this rank's local,
unreduced gradient (attached); the average exists only as each rank's owned slices. Code
that needs a parameter's gradient (a norm per layer, adaptive clipping, a gradient-noise
estimate) gets it here:

- ``grad_norms``: each parameter's norm, or its norm per output row (``unitwise``, as in
  adaptive gradient clipping), from the owned slices: every rank reduces what it owns, and
  one all-reduce of the partial sums (float64) combines them. Equal to torch's norm of the
  averaged gradient up to the order of the sum (bitwise on one process).
- ``scale_grads_``: multiply each parameter's gradient by a factor (a scalar, or one per
  output row): each rank scales what it owns; no communication.
- ``full_grad``: one parameter's whole averaged gradient (an all-reduce of its size).
- ``gathered_grads``: for a stretch of code that reads ``p.grad`` (a framework hook, a
  logger): every parameter's ``p.grad`` becomes its averaged gradient (one all-reduce per
  bucket; the full gradients' memory while it lasts), and what the code leaves in ``p.grad``
  goes back into the shards at the end.

All three first finish the reduction (``ShardedAdamW.gradient_shards``), so they are
collectives where that launches one; ``grad_norms`` and ``full_grad`` always are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .bucket import as_real

if TYPE_CHECKING:
    from .bucket import ShardBucket
    from .optimizer import ShardedAdamW


def _owned_grad(opt: ShardedAdamW, p: torch.Tensor) -> tuple[ShardBucket, int, torch.Tensor]:
    b, i = opt.slot_of(p)
    return b, i, b.owned(b.grad, i)


def _torch_norm(g: torch.Tensor, norm_type: float, unitwise: bool) -> torch.Tensor:
    if unitwise and g.ndim > 1:
        return torch.linalg.vector_norm(g, norm_type, dim=tuple(range(1, g.ndim)), keepdim=True)
    return torch.linalg.vector_norm(g, norm_type)


def _rows(p: torch.Tensor) -> int:
    """Output rows of ``p`` for a unitwise norm: dimension 0 for ``ndim > 1``, else one."""
    return p.shape[0] if p.ndim > 1 else 1


def _row_partials(
    owned: torch.Tensor, start: int, row_len: int, rows: int, norm_type: float
) -> torch.Tensor:
    """Per-row partial reductions (sum of ``|x|^p``, or max for inf) of the owned flat range
    starting at ``start`` of a parameter whose rows are ``row_len`` long: one float64 entry
    per row of the whole parameter, zero where this rank owns none of it."""
    out = torch.zeros(rows, dtype=torch.float64, device=owned.device)
    x = owned.double().abs()
    if not math.isinf(norm_type):
        x = x.pow(norm_type)
    for row, seg in _row_segments(x, start, row_len):
        dim = 0 if isinstance(row, int) else 1
        out[row] = seg.amax(dim) if math.isinf(norm_type) else seg.sum(dim)
    return out


@torch.no_grad()
def grad_norms(
    opt: ShardedAdamW, params: list[torch.Tensor], norm_type: float, unitwise: bool
) -> list[torch.Tensor]:
    """The norm of each parameter's averaged gradient (``unitwise``: per output row, shaped
    ``(rows, 1, ..., 1)`` for ``ndim > 1`` as ``timm.utils.agc.unitwise_norm`` gives),
    in the gradient shard's dtype. Collective."""
    norm_type = float(norm_type)
    if opt.full_grads:  # p.grad is the averaged gradient
        return [_torch_norm(p.grad, norm_type, unitwise) for p in params]
    opt.gradient_shards()
    if not opt.comm.distributed:  # each parameter's gradient is one owned slice: torch's norm
        out = []
        for p in params:
            _, _, g = _owned_grad(opt, p)
            g = g.view(p.shape if not p.is_complex() else (*p.shape, 2))
            out.append(_torch_norm(g, norm_type, unitwise and p.ndim > 1))
        return out
    parts, shapes = [], []
    for p in params:
        b, i, g = _owned_grad(opt, p)
        s = b.layout.slots[i]
        rows = _rows(p) if unitwise else 1
        row_len = max(s.numel // rows, 1)
        parts.append(_row_partials(g, s.start, row_len, rows, norm_type))
        shape = (rows,) + (1,) * (p.ndim - 1) if unitwise and p.ndim > 1 else ()
        shapes.append((shape, g.dtype))
    flat = torch.cat(parts)
    opt.comm.all_reduce_(flat, "max" if math.isinf(norm_type) else "sum", shard_only=True)
    if not math.isinf(norm_type):
        flat = flat.pow(1.0 / norm_type)
    out, k = [], 0
    for part, (shape, dtype) in zip(parts, shapes):
        n = part.numel()
        out.append(flat[k : k + n].to(dtype).reshape(shape))
        k += n
    return out


@torch.no_grad()
def scale_grads_(
    opt: ShardedAdamW, params: list[torch.Tensor], factors: list[torch.Tensor | float]
) -> None:
    """Multiply each parameter's averaged gradient by its factor: a scalar, or one value per
    output row (``(rows, 1, ..., 1)``). Each rank scales the elements it owns."""
    if opt.full_grads:  # p.grad is the averaged gradient
        for p, f in zip(params, factors):
            if p.grad is not None:
                p.grad.mul_(torch.as_tensor(f, device=p.grad.device).to(p.grad.dtype))
        return
    opt.gradient_shards()
    for p, f in zip(params, factors):
        b, i, g = _owned_grad(opt, p)
        if g.numel() == 0:
            continue
        f = torch.as_tensor(f, device=g.device)
        if f.numel() == 1:
            g.mul_(f.reshape(()).to(g.dtype) if f.is_floating_point() else f)
            continue
        s = b.layout.slots[i]
        f = f.reshape(-1).to(g.dtype)
        for row, seg in _row_segments(g, s.start, s.numel // f.numel()):
            seg.mul_(f[row] if isinstance(row, int) else f[row].unsqueeze(1))


def _row_segments(owned: torch.Tensor, start: int, row_len: int):
    """``(row, view)`` pieces of the owned flat range starting at ``start``: a partial row
    (``row`` an int, ``view`` 1-D), then whole rows (``row`` a slice, ``view`` 2-D), then a
    partial row."""
    n, pos, first = owned.numel(), 0, start // row_len
    if start % row_len and n:
        head = min(row_len - start % row_len, n)
        yield first, owned[:head]
        first, pos = first + 1, head
    whole = (n - pos) // row_len
    if whole:
        yield slice(first, first + whole), owned[pos : pos + whole * row_len].view(whole, row_len)
        pos += whole * row_len
    if pos < n:
        yield first + whole, owned[pos:]


@torch.no_grad()
def full_grad(opt: ShardedAdamW, p: torch.Tensor) -> torch.Tensor | None:
    """Parameter ``p``'s whole averaged gradient, shaped like ``p`` (a new tensor, in the
    gradient shard's dtype), or None where no rank had a gradient for it this step.
    Collective: one all-reduce of ``p``'s size over the shard group."""
    if opt.full_grads:  # p.grad is the averaged gradient
        return None if p.grad is None else p.grad.detach().clone()
    shards = opt.gradient_shards()
    b, i, g = _owned_grad(opt, p)
    if not any(t is b.grad for t in shards):
        return None
    s = b.layout.slots[i]
    out = torch.zeros(s.numel, dtype=g.dtype, device=g.device)
    out[s.start : s.end] = g
    opt.comm.all_reduce_(out, "sum", shard_only=True)
    shape = p.shape if not p.is_complex() else (*p.shape, 2)
    out = out.view(shape)
    return torch.view_as_complex(out) if p.is_complex() else out


@contextmanager
def gathered_grads(opt: ShardedAdamW) -> Iterator[None]:
    """Within the context every parameter whose bucket holds a gradient this step has
    ``p.grad`` = its averaged gradient, bit for bit (in the parameter's dtype: rounded where
    the shards keep fp32 for low-precision parameters; zeros where no rank had one); on exit
    each rank takes its owned part of every ``p.grad`` that was changed (in place or
    replaced) back into its shard, and ``p.grad`` is None again. Collective on entry (one
    all-reduce per bucket)."""
    if opt.full_grads:  # p.grad already is the averaged gradient
        yield
        return
    shards = opt.gradient_shards()
    opt.sync_params()
    held = [b for b in opt.buckets if any(t is b.grad for t in shards)]
    with torch.no_grad():
        for b in held:
            S = b.layout.shard_numel
            flat = torch.zeros(b.layout.padded_numel, dtype=b.grad.dtype, device=b.grad.device)
            flat[b.rank * S : (b.rank + 1) * S] = b.grad
            opt.comm.all_reduce_(flat, "sum", shard_only=True)
            for p, s in zip(b.params, b.layout.slots):
                shape = p.shape if not p.is_complex() else (*p.shape, 2)
                g = flat[s.base : s.base + s.numel].view(shape).to(as_real(p).dtype)
                p.grad = torch.view_as_complex(g) if p.is_complex() else g
    given = {p: (p.grad, p.grad._version) for b in held for p in b.params}
    try:
        yield
    finally:
        with torch.no_grad():
            for b in held:
                for i, (p, s) in enumerate(zip(b.params, b.layout.slots)):
                    g, version = given[p]
                    if p.grad is not None and (p.grad is not g or p.grad._version != version):
                        # changed (in place, or replaced): the shard takes the new values
                        b.owned(b.grad, i).copy_(as_real(p.grad).reshape(-1)[s.start : s.end])
                    p.grad = None
