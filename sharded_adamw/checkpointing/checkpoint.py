"""Sharded checkpoints of a model and its ``ShardedAdamW`` in torch's distributed layout.

``save_checkpoint`` and ``load_checkpoint`` are built on ``torch.distributed.checkpoint`` (DCP)
and write what a DDP or FSDP2 job with ``torch.optim.AdamW`` writes with
``dcp.save({"model": model_sd, "optim": optim_sd})`` after
``model_sd, optim_sd = get_state_dict(model, optim)``:

- ``model.<fqn>``: every entry of the model's ``state_dict()`` (no DDP ``module.`` prefix).
- ``optim.state.<fqn>.exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad): shaped
  like the parameter. ``optim.state.<fqn>.step``: a 0-d float32 tensor.
- ``optim.param_groups.<i>.<key>``: each param group's hyperparameters, with ``params`` the
  list of parameter names.
- ``sharded_adamw``: the format and the caller's ``extra`` state (other readers ignore it).

So DDP, FSDP2 and ShardedAdamW jobs load each other's checkpoints at any world size.

Each rank writes only the elements it owns. Its flat owned range of a parameter
(``layout.owned_range``) is a few rectangular boxes of the parameter's shape (``boxes.py``);
they go to DCP as the local shards of a ``ShardedTensor`` whose metadata lists every rank's
boxes, and each local shard is a view of the optimizer's live state, so nothing is copied or
gathered. A load reads the boxes of the new owner from whatever pieces the writer recorded
(whole tensors from DDP, ``Shard(0)`` rows from FSDP2, boxes from ShardedAdamW).

Master weights. bf16/fp16 parameters with fp32 master weights are saved as the fp32 run they
stand for: ``model.<fqn>`` of a trained parameter holds the fp32 master weights (written as
boxes by their owners) and the state is fp32, which is what an fp32 model trained with AdamW,
or FSDP2 with ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` (fp32 sharded parameters),
writes. A load takes the masters from ``model.<fqn>`` and rounds them to the parameter dtype.
Other entries (buffers, frozen parameters) keep their dtype.

Atomic and verified. A save writes into ``.<name>.tmp`` next to ``path``. When DCP has finished
on every rank, the ranks hash the files (each takes a share) and the leader (shard rank 0 of
replica 0) writes ``manifest.json`` with every file's size and sha256, then publishes by
renames: ``path`` to ``.<name>.old``, ``.<name>.tmp`` to ``path``, and only then removes
``.<name>.old``. A save killed at any point leaves the previous checkpoint complete: at ``path``,
or at ``.<name>.old`` in the instant between the two renames, where loads look and the next
save restores it from. A load verifies the manifest (sizes, and sha256 with each rank taking a
share of the files), checks the checkpoint's names, shapes and dtypes against the model and
optimizer, reads everything into temporary tensors, checks the param groups, and only then
copies into the model and the optimizer: a failed load changes nothing. A checkpoint written
by DCP alone (no manifest) is checked by DCP's own metadata instead.

Checkpoints of sharded-adamw 0.1 (format ``sharded-adamw/1``: ``optim/<name>/exp_avg`` as
1-D tensors of the parameter's ``numel``, bf16 parameters in ``model/<fqn>`` and their fp32
masters in ``optim/<name>/master_param``) still load, by the same box reads over 1-D shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.nn.parallel import DistributedDataParallel

from ..core.bucket import ShardBucket
from ..core.optimizer import RUNTIME_KEYS, ShardedAdamW
from ..core.state_formats import BLOCK, BlockwiseInt8
from .boxes import flat_range_boxes

FORMAT = "sharded-adamw/2"
OLD_FORMAT = "sharded-adamw/1"
MANIFEST = "manifest.json"
MARKER = "sharded_adamw"  # {"format", "extra"}: written by save_checkpoint, ignored by others


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or does not fit the model and optimizer."""


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save ``model`` and its sharded ``optimizer`` to the directory ``path``, in the layout
    of ``get_state_dict(model, optimizer)`` (module docstring). Collective.

    ``model`` may be wrapped in ``DistributedDataParallel``; ``optimizer`` is a ``ShardedAdamW``
    or a wrapper of one (accelerate's ``AcceleratedOptimizer``). ``extra`` is the caller's own
    state, the same on every rank (one copy is written), made of tensors and plain Python
    data; ``load_checkpoint`` returns it. ``path`` appears, or is replaced, only once the new
    checkpoint is complete on disk; an existing ``path`` that is not a checkpoint (nor an
    empty directory) is never replaced.
    """
    path = Path(path)
    opt = _sharded(optimizer)
    opt.sync_params()  # parameter all-gathers in flight (overlap_param_gather) land first
    module = _unwrap(model)
    ranks = _Ranks(opt)
    names = _param_names(module, opt)
    owned = owned_state(opt)
    by_key = dict(module.named_parameters(remove_duplicate=False))
    model_sd: dict[str, Any] = {}
    for key, value in module.state_dict().items():
        o = owned.get(by_key.get(key))
        master = o.tensors.get("master_param") if o is not None else None
        model_sd[key] = value if master is None else ranks.boxes(master, value.shape, o)
    optim_state = {
        names[p]: {
            "step": o.step,
            **{k: ranks.boxes(t, p.shape, o) for k, t in o.tensors.items() if k != "master_param"},
            **{
                k: ranks.boxes(t, _codes_shape(k, p), o if k.endswith("_codes") else o.blocks())
                for k, t in o.codes.items()
            },
        }
        for p, o in owned.items()
    }
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": members}
        for g, members in zip(opt.param_groups, _group_names(opt, names))
    ]
    state = {
        "model": model_sd,
        "optim": {"state": optim_state, "param_groups": groups},
        MARKER: _to_bytes({"format": FORMAT, "extra": extra or {}}),
    }
    tmp, _ = _siblings(path)
    ranks.agree("preparing", lambda: _prepare(path) if ranks.leader else None)
    with _quiet():
        dcp.save(
            state,
            storage_writer=FileSystemWriter(tmp),
            process_group=ranks.group,
            **_no_dist(dcp.save, ranks.distributed),
        )

    def hash_share() -> dict[str, tuple[int, str]]:
        files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
        return {f: _digest(tmp / f) for f in files[ranks.index :: ranks.size]}

    digests = {f: d for share in ranks.agree("hashing", hash_share) for f, d in share.items()}
    ranks.agree("publishing", lambda: _publish(path, digests) if ranks.leader else None)


def _no_dist(fn: Callable, distributed: bool) -> dict[str, bool]:
    """``no_dist=`` for DCP's ``save``/``load`` where they take it (torch 2.6 has no such
    argument and decides it from ``dist.is_initialized()``, which agrees with the optimizer
    because an optimizer built before the process group refuses to step)."""
    return {"no_dist": not distributed} if "no_dist" in inspect.signature(fn).parameters else {}


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """Load a checkpoint at any world size: one written by ``save_checkpoint`` (this version
    or 0.1), or by ``dcp.save({"model": ..., "optim": ...})`` of ``get_state_dict`` from a
    DDP or FSDP2 job with ``torch.optim.AdamW``. Collective.

    Raises ``CheckpointError``, naming the file or the parameter, when the checkpoint is
    missing, incomplete or corrupt, or when its parameters (names, shapes, dtypes, state
    keys, param groups) differ from ``model``'s and ``optimizer``'s; the model and optimizer are
    then unchanged. A parameter with no state at all in the checkpoint (torch creates state at
    a parameter's first update) starts fresh, as in ``torch.optim.AdamW``. Hyperparameters are
    restored, except how the update runs (``foreach``, ``fused``, ...). Returns the ``extra``
    dict passed to ``save_checkpoint`` (empty for a checkpoint written by DCP alone).
    """
    opt = _sharded(optimizer)
    opt.sync_params()  # an all-gather in flight would overwrite what is loaded
    module = _unwrap(model)
    ranks = _Ranks(opt)
    names = _param_names(module, opt)
    found = ranks.agree("verifying the files", lambda: _verify(Path(path), ranks))
    where, fmt = found[ranks.index]
    saved = FileSystemReader(where).read_metadata().state_dict_metadata
    owned = owned_state(opt)
    by_key = dict(module.named_parameters(remove_duplicate=False))
    model_sd = module.state_dict()
    want: dict[str, tuple[tuple, torch.dtype, str]] = {}
    first: dict[str, Any] = {}  # read targets of the first DCP read
    masters: dict[str, Any] = {}  # the second read: masters share their keys with the model
    for key, value in model_sd.items():
        o = owned.get(by_key.get(key))
        fp32 = not fmt.old and o is not None and "master_param" in o.tensors
        dtype = torch.float32 if fp32 else value.dtype
        want[fmt.model(key)] = (tuple(value.shape), dtype, f"model entry {key!r}")
        first[fmt.model(key)] = torch.empty_like(value)
    temps: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    for p, o in owned.items():
        name, shape = names[p], (p.numel(),) if fmt.old else tuple(p.shape)
        keys = ["step", *(k for k in o.tensors if fmt.old or k != "master_param")]
        if not any(fmt.state(name, k) in saved for k in keys):
            continue  # no state for p in the checkpoint: it starts fresh
        temps[p] = {"step": torch.empty_like(o.step)}
        for k in keys:
            what = f"optimizer state {k!r} of parameter {name!r}"
            if k == "step":
                want[fmt.state(name, k)] = ((), o.step.dtype, what)
                first[fmt.state(name, k)] = temps[p]["step"]
                continue
            temps[p][k] = torch.empty_like(o.tensors[k])
            want[fmt.state(name, k)] = (shape, o.tensors[k].dtype, what)
            first[fmt.state(name, k)] = ranks.boxes(temps[p][k], shape, o)
        if all(fmt.state(name, k) in saved for k in o.codes):  # int8 state read as saved
            for k, t in o.codes.items():
                temps[p][k] = torch.empty_like(t)
                what = f"optimizer state {k!r} of parameter {name!r}"
                want[fmt.state(name, k)] = (_codes_shape(k, p), t.dtype, what)
                where_ = o if k.endswith("_codes") else o.blocks()
                first[fmt.state(name, k)] = ranks.boxes(temps[p][k], _codes_shape(k, p), where_)
    for p, o in owned.items():
        if "master_param" in o.tensors and not fmt.old:
            temps.setdefault(p, {})["master_param"] = torch.empty_like(o.tensors["master_param"])
            masters[fmt.model(names[p])] = ranks.boxes(temps[p]["master_param"], p.shape, o)
    _check_tensors(where, fmt, saved, want)
    first.update((k, "") for k in fmt.small_keys(saved))
    for read in (first, masters):
        if read:
            _read(where, read, ranks)
    groups, extra = fmt.groups_and_extra(first)
    _check_groups(where, groups, _group_names(opt, names))
    module.load_state_dict({k: first[fmt.model(k)] for k in model_sd})
    with torch.no_grad(), opt.state_load():
        for p, o in owned.items():
            loaded = temps.get(p, {})
            o.step.copy_(loaded.get("step", torch.zeros(())))
            for k, t in o.tensors.items():
                if k in loaded:
                    t.copy_(loaded[k])
                elif k == "master_param":  # a fresh parameter of a 0.1 checkpoint
                    t.copy_(p.detach().reshape(-1)[o.start : o.end])
                else:
                    t.zero_()
        for b in {id(o.bucket): o for o in owned.values()}.values():
            b.bucket.store_buffers(b.buffers)  # rounded, quantized, remainders taken
        for p, o in owned.items():  # int8 state saved as codes: exactly as it was
            for k, t in o.codes.items():
                if k in temps.get(p, {}):
                    t.copy_(temps[p][k])
    for g, sg in zip(opt.param_groups, groups):
        g.update({k: v for k, v in sg.items() if k not in RUNTIME_KEYS})
    return extra


def _read(where: Path, targets: dict[str, Any], ranks: _Ranks) -> None:
    """DCP's load of ``targets`` from ``where``; its failures (a file missing or cut short in
    a checkpoint without our manifest) become ``CheckpointError`` on every rank."""
    try:
        with _quiet():
            dcp.load(
                targets,
                storage_reader=FileSystemReader(where),
                process_group=ranks.group,
                **_no_dist(dcp.load, ranks.distributed),
            )
    except CheckpointException as e:
        raise CheckpointError(f"reading checkpoint {where} failed: {e}") from e


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether a complete checkpoint can be loaded from ``path`` (local, not collective): one
    of ours with its manifest, or one that DCP alone wrote."""
    return _find(Path(path)) is not None


# ---- the optimizer's state, as a checkpoint sees it ----------------------------------------


@dataclass
class OwnedState:
    """This rank's state of one parameter: live 1-D views of its owned flat range
    ``[start, end)`` under the state-dict keys, and its 0-d step count."""

    start: int
    end: int
    tensors: dict[str, torch.Tensor]
    step: torch.Tensor
    ranges: list[tuple[int, int]]  # every shard rank's owned flat range, in rank order
    bucket: ShardBucket
    buffers: dict[str, torch.Tensor]  # the bucket's ``state_buffers()``, which ``tensors`` cut
    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # int8 state, live views:
    # ``<key>_codes`` (one per element) and ``<key>_scales`` (one per block, see ``blocks``)

    def blocks(self) -> OwnedState:
        """The same ownership counted in int8 blocks: a parameter's blocks start at its first
        element and every owned range starts at a block (``layout.py``)."""
        up = lambda n: -(-n // BLOCK)  # noqa: E731
        ranges = [(s // BLOCK, up(e)) if e > s else (up(e), up(e)) for s, e in self.ranges]
        start, end = (self.start // BLOCK, up(self.end)) if self.end > self.start else (0, 0)
        return OwnedState(start, end, {}, self.step, ranges, self.bucket, {})


def owned_state(opt: ShardedAdamW) -> dict[torch.Tensor, OwnedState]:
    """Every parameter with state, in the optimizer's bucket order. The one place that reads
    the optimizer's internals (buckets, slots, state buffers), read-only."""
    out = {}
    for b in opt.buckets:
        buffers = b.state_buffers()
        for i, (p, slot) in enumerate(zip(b.params, b.layout.slots)):
            tensors = {k: b.owned(t, i) for k, t in buffers.items()}
            codes = {}
            for key, store in b.moments.items():
                if isinstance(store, BlockwiseInt8):
                    lo, hi = b.block_range(i)
                    codes[f"{key}_codes"] = b.owned(store.codes, i)
                    codes[f"{key}_scales"] = store.scales[lo // BLOCK : hi // BLOCK]
            out[p] = OwnedState(
                slot.start, slot.end, tensors, b.steps[i], b.layout.ranges(i), b, buffers, codes
            )
    return out


def _codes_shape(key: str, p: torch.Tensor) -> tuple:
    """The checkpoint shape of an int8 entry of ``p``: codes shaped like ``p``, scales one
    per block of its flat elements."""
    return tuple(p.shape) if key.endswith("_codes") else (-(-p.numel() // BLOCK),)


# ---- formats ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Format:
    """Where a checkpoint format keeps each thing. ``old`` is sharded-adamw 0.1's layout;
    ``ours`` says whether ``save_checkpoint`` wrote it (else DCP alone did)."""

    old: bool
    ours: bool

    def model(self, key: str) -> str:
        return f"model/{key}" if self.old else f"model.{key}"

    def state(self, name: str, key: str) -> str:
        return f"optim/{name}/{key}" if self.old else f"optim.state.{name}.{key}"

    def describe(self, key: str) -> str:
        """A model entry or optimizer state key of the checkpoint, in words, for errors."""
        if key.startswith(self.model("")):
            return f"model entry {key[len(self.model('')) :]!r}"
        sep, prefix = ("/", "optim/") if self.old else (".", "optim.state.")
        name, _, state = key[len(prefix) :].rpartition(sep)
        return f"optimizer state {state!r} of parameter {name!r}"

    def is_tensor_entry(self, key: str) -> bool:
        """Whether ``key`` is a model entry or optimizer state (what a load must account for)."""
        return key.startswith(("model/", "optim/") if self.old else ("model.", "optim.state."))

    def small_keys(self, saved: dict) -> list[str]:
        """The non-tensor entries a load reads: param groups and the caller's extra."""
        if self.old:
            return ["meta", "extra"]
        keys = [k for k, md in saved.items() if isinstance(md, BytesStorageMetadata)]
        return [k for k in keys if k.startswith("optim.param_groups.") or k == MARKER]

    def groups_and_extra(self, read: dict) -> tuple[list[dict], dict[str, Any]]:
        """The param groups (``params`` as names) and the extra dict from what was read."""
        if self.old:
            return _from_bytes(read["meta"])["param_groups"], _from_bytes(read["extra"])
        groups: dict[int, dict] = {}
        for key, value in read.items():
            if key.startswith("optim.param_groups."):
                index, _, name = key[len("optim.param_groups.") :].partition(".")
                groups.setdefault(int(index), {})[name] = value
        extra = _from_bytes(read[MARKER])["extra"] if self.ours else {}
        return [groups[i] for i in sorted(groups)], extra


# ---- ranks --------------------------------------------------------------------------------


class _Ranks:
    """The optimizer's data-parallel ranks as a checkpoint sees them: the leader, this rank's
    share of per-file work, the process group DCP runs over, and who owns which boxes.

    Construction is collective (one small all-gather, replica-major, of global ranks).
    """

    def __init__(self, opt: ShardedAdamW):
        comm = self.comm = opt.comm
        self.device = next(  # where the state lives; the small all-gathers run there too
            (t.device for s in opt.state.values() for k, t in s.items() if k != "step"),
            torch.device("cpu"),
        )
        order = self.order = comm.all_gather_object(comm.global_rank, self.device)
        self.size, self.index = len(order), order.index(comm.global_rank)
        self.leader = self.index == 0
        self.distributed = comm.distributed
        self.group = None  # DCP's process group; None is the default group
        self.shard_group = comm.shard_group
        self.shard_ranks = [comm.global_rank]  # global rank of each shard rank
        if not comm.distributed:
            return
        self.shard_ranks = dist.get_process_group_ranks(comm.shard_group)
        if comm.replicate_group is None:
            self.group = comm.shard_group
        elif self.size != dist.get_world_size():
            raise CheckpointError(
                f"checkpoints of a 2-D mesh need the mesh to span the default process group "
                f"({self.size} of {dist.get_world_size()} ranks here)"
            )

    def boxes(self, local: torch.Tensor, shape: tuple, owned: OwnedState) -> torch.Tensor:
        """A tensor of global ``shape`` of which this rank holds the flat range of ``owned``
        as ``local`` (1-D), as DCP should see it: a ``ShardedTensor`` whose local shards are
        views of ``local``, one per box, with every shard rank's boxes in its metadata (the
        replicas of a 2-D mesh record the same boxes, which DCP writes once); in a single
        process, ``local`` in ``shape``."""
        if not self.distributed:
            return local.view(shape)
        properties = TensorProperties(dtype=local.dtype)
        shards, everyone = [], []
        for r, global_rank in enumerate(self.shard_ranks):
            start, end = owned.ranges[r]
            for box in flat_range_boxes(shape, start, end):
                md = ShardMetadata(
                    list(box.offsets), list(box.sizes), f"rank:{global_rank}/{local.device}"
                )
                everyone.append(md)
                if global_rank == self.comm.global_rank:
                    view = local[box.start - owned.start : box.end - owned.start]
                    shards.append(Shard(view.view(box.sizes), md))
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards,
            ShardedTensorMetadata(everyone, torch.Size(shape), properties),
            process_group=self.shard_group,
        )

    def agree(self, what: str, work: Callable[[], Any]) -> list:
        """Run ``work`` here and return every rank's result (replica-major); if it raised on
        any rank, raise ``CheckpointError`` on every rank, so that no rank waits for others in
        a later collective."""
        result, error, failure = None, None, None
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            error, failure = str(e) if isinstance(e, CheckpointError) else repr(e), e
        gathered = self.comm.all_gather_object((result, error), self.device)
        errors: dict[str, list[int]] = {}
        for rank, (_, err) in zip(self.order, gathered):
            if err is not None:
                errors.setdefault(err, []).append(rank)
        if errors:
            if len(errors) == 1 and len(next(iter(errors.values()))) == self.size:
                message = next(iter(errors))
            else:
                message = f"{what} failed: " + "; ".join(
                    f"{err} (rank {', '.join(map(str, rs))})" for err, rs in errors.items()
                )
            raise CheckpointError(message) from failure
        return [r for r, _ in gathered]


# ---- names and checks ----------------------------------------------------------------------


def _sharded(optimizer: torch.optim.Optimizer) -> ShardedAdamW:
    opt = optimizer
    while not isinstance(opt, ShardedAdamW) and isinstance(
        getattr(opt, "optimizer", None), torch.optim.Optimizer
    ):
        opt = opt.optimizer
    if not isinstance(opt, ShardedAdamW):
        raise TypeError(
            "sharded checkpoints need a ShardedAdamW (or a wrapper of one, such as accelerate's "
            f"AcceleratedOptimizer), got {type(optimizer).__name__}"
        )
    return opt


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _param_names(module: torch.nn.Module, opt: ShardedAdamW) -> dict[torch.Tensor, str]:
    """Every optimizer parameter's name in the model (its first name, as torch's
    ``get_state_dict`` writes it), in param-group order."""
    in_model = {p: n for n, p in module.named_parameters()}
    names = {}
    for gi, g in enumerate(opt.param_groups):
        for j, p in enumerate(g["params"]):
            if p not in in_model:
                raise CheckpointError(
                    f"parameter #{j} of param group {gi} (shape {tuple(p.shape)}) of the "
                    "optimizer is not a parameter of the model"
                )
            names[p] = in_model[p]
    return names


def _group_names(opt: ShardedAdamW, names: dict[torch.Tensor, str]) -> list[list[str]]:
    return [[names[p] for p in g["params"]] for g in opt.param_groups]


def _check_tensors(
    where: Path, fmt: _Format, saved: dict, want: dict[str, tuple[tuple, torch.dtype, str]]
) -> None:
    """Every tensor the model and optimizer need is in the checkpoint with the same shape and
    dtype, and the checkpoint holds no model entry or optimizer state that they lack."""
    problems = []
    for key, (shape, dtype, what) in want.items():
        md = saved.get(key)
        if not isinstance(md, TensorStorageMetadata):
            problems.append(f"{what} is not in the checkpoint")
        elif tuple(md.size) != shape or md.properties.dtype != dtype:
            problems.append(
                f"{what} is {tuple(md.size)} {md.properties.dtype} in the checkpoint "
                f"and {shape} {dtype} here"
            )
    problems += [
        f"{fmt.describe(key)} is in the checkpoint but not here"
        for key in saved
        if fmt.is_tensor_entry(key) and key not in want and not _is_int8_entry(key)
    ]
    if problems:
        shown = "\n  ".join(problems[:8]) + ("\n  ..." if len(problems) > 8 else "")
        hint = any("'max_exp_avg_sq'" in p or "'master_param'" in p for p in problems)
        raise CheckpointError(
            f"checkpoint {where} does not fit the model and optimizer ({len(problems)} problems"
            + ("; amsgrad and master weights must be as when saved" if hint else "")
            + f"):\n  {shown}"
        )


def _is_int8_entry(key: str) -> bool:
    """Whether ``key`` holds int8 state (codes or scales), which a run without int8 state
    skips: it reads the same state dequantized under the torch keys."""
    return key.startswith("optim.state.") and key.endswith(("_codes", "_scales"))


def _check_groups(where: Path, saved: list[dict], mine: list[list[str]]) -> None:
    if len(saved) != len(mine):
        raise CheckpointError(
            f"checkpoint {where} has {len(saved)} param groups, the optimizer has {len(mine)}"
        )
    for gi, (sg, names) in enumerate(zip(saved, mine)):
        if sg["params"] == names:
            continue
        diff = f"{len(sg['params'])} parameters in the checkpoint, {len(names)} here"
        for j, (theirs, ours) in enumerate(zip(sg["params"], names)):
            if theirs != ours:
                diff = f"parameter #{j} is {theirs!r} in the checkpoint and {ours!r} here"
                break
        raise CheckpointError(f"checkpoint {where}: param group {gi} differs ({diff})")


# ---- files ---------------------------------------------------------------------------------


def _siblings(path: Path) -> tuple[Path, Path]:
    """Where a save writes (``.<name>.tmp``) and where the checkpoint it replaces waits to be
    removed (``.<name>.old``)."""
    return path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"


def _find(path: Path) -> Path | None:
    if (path / MANIFEST).is_file() or _written_by_dcp_alone(path):
        return path
    _, old = _siblings(path)
    if not path.exists() and (old / MANIFEST).is_file():  # a save died between its renames
        return old
    return None


def _written_by_dcp_alone(path: Path) -> bool:
    """Whether ``path`` is a complete DCP checkpoint that ``save_checkpoint`` did not write
    (DCP writes ``.metadata`` last, once every rank's files are complete)."""
    if (path / MANIFEST).is_file() or not (path / ".metadata").is_file():
        return False
    return MARKER not in FileSystemReader(path).read_metadata().state_dict_metadata


def _prepare(path: Path) -> None:
    """Leader: check that ``path`` may be replaced, finish what a killed save left, and make
    an empty temporary directory."""
    tmp, old = _siblings(path)
    if path.exists() and not (path / MANIFEST).is_file():
        if not path.is_dir() or any(path.iterdir()):
            raise CheckpointError(f"{path} exists and is not a checkpoint; not replacing it")
    if not path.exists() and (old / MANIFEST).is_file():
        os.rename(old, path)
    for leftover in (old, tmp):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)


def _publish(path: Path, digests: dict[str, tuple[int, str]]) -> None:
    """Leader: write the manifest into the complete temporary directory, then swap it in."""
    tmp, old = _siblings(path)
    files = {f: {"size": size, "sha256": sha} for f, (size, sha) in sorted(digests.items())}
    with open(tmp / MANIFEST, "w") as fh:
        json.dump({"format": FORMAT, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if path.exists():
        os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)  # the new checkpoint is durable before the old one goes
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
        _fsync_dir(path.parent)


def _verify(path: Path, ranks: _Ranks) -> tuple[Path, _Format]:
    """Find the checkpoint and its format, and check this rank's share of the files its
    manifest lists (existence, size, sha256). Returns the directory to read and the format.
    A checkpoint that DCP alone wrote has no manifest: DCP's metadata is its check."""
    where = _find(path)
    if where is None:
        if (path / ".metadata").is_file():
            raise CheckpointError(
                f"{path} has no {MANIFEST}: a checkpoint of sharded-adamw that is incomplete "
                "or damaged"
            )
        if path.exists():
            raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete checkpoint")
        raise CheckpointError(f"no checkpoint at {path}")
    if not (where / MANIFEST).is_file():
        return where, _Format(old=False, ours=False)
    manifest = json.loads((where / MANIFEST).read_text())
    if manifest.get("format") not in (FORMAT, OLD_FORMAT):
        raise CheckpointError(
            f"{where} is a {manifest.get('format')!r} checkpoint; this version of sharded-adamw "
            f"reads {FORMAT} and {OLD_FORMAT}"
        )
    files = sorted(manifest["files"])
    for name in files[ranks.index :: ranks.size]:
        f, entry = where / name, manifest["files"][name]
        if not f.is_file():
            raise CheckpointError(f"checkpoint {where}: file {name} is missing")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {where}: file {name} has {f.stat().st_size} bytes, the manifest "
                f"says {entry['size']} (truncated or overwritten)"
            )
        if _digest(f)[1] != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {where}: file {name} does not match its sha256 in the manifest"
            )
    return where, _Format(old=manifest["format"] == OLD_FORMAT, ours=True)


def _digest(f: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(f, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every call without a process group (here a single process is intended),
    and on every ``ShardedTensor`` it meets (the one type that lets a rank hand DCP several
    boxes of a tensor; DTensor cannot)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor")
        yield
