"""Sharded checkpoints of a model and its ``ShardedAdamW``: each rank writes only what it owns.

``save_checkpoint`` and ``load_checkpoint`` are built on ``torch.distributed.checkpoint`` (DCP).
A checkpoint is one DCP directory whose flat state dict holds

- ``model/<key>``: every entry of the model's ``state_dict()``. The model is replicated, so DCP
  writes each entry once, spread over the ranks.
- ``optim/<name>/<key>``: the AdamW state (``exp_avg``, ``exp_avg_sq``, and ``max_exp_avg_sq``
  and ``master_param`` where the optimizer has them) of the parameter called ``<name>`` in the
  model, as a 1-D DTensor of the parameter's ``numel`` elements placed ``[Shard(0)]`` over the
  shard group (``[Replicate(), Shard(0)]`` over a 2-D mesh). Its local tensor is this rank's
  live view of the elements it owns, so no rank ever holds another rank's state.
- ``optim/<name>/step``: the parameter's step count (the same on every rank).
- ``meta``: the format, the world size, and each param group's hyperparameters and parameter
  names. ``extra``: the caller's own small state (a step counter, a scheduler's state dict).

``Shard(0)`` of a 1-D tensor cuts it by the ``torch.chunk`` rule, which is the optimizer's own
layout (``layout.owned_range``), so DCP's metadata records each rank's chunk with its global
offset and a load at any other world size reads each new owner's range from the files that
hold it.

Atomic and verified. A save writes into ``.<name>.tmp`` next to ``path``. When DCP has finished
on every rank, the ranks hash the files (each takes a share) and the leader (shard rank 0 of
replica 0) writes ``manifest.json`` with every file's size and sha256, then publishes by
renames: ``path`` to ``.<name>.old``, ``.<name>.tmp`` to ``path``, and only then removes
``.<name>.old``. A save killed at any point leaves the previous checkpoint complete: at ``path``,
or at ``.<name>.old`` in the instant between the two renames, where loads look and the next
save restores it from. A load verifies the manifest (sizes, and sha256 with each rank taking a
share of the files), checks the checkpoint's names, shapes and dtypes against the model and
optimizer, reads everything into temporary tensors, checks the param groups, and only then
copies into the model and the optimizer: a failed load changes nothing.
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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.nn.parallel import DistributedDataParallel

from .optimizer import ShardedAdamW

FORMAT = "sharded-adamw/1"
MANIFEST = "manifest.json"
# Param-group keys that say how this job runs the update rather than where training is: a load
# keeps the loading optimizer's values (as constructed for this job's devices).
RUNTIME_KEYS = ("params", "param_names", "foreach", "fused", "capturable", "differentiable")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or does not fit the model and optimizer."""


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save ``model`` and its sharded ``optimizer`` to the directory ``path``. Collective.

    ``model`` may be wrapped in ``DistributedDataParallel``; ``optimizer`` is a ``ShardedAdamW``
    or a wrapper of one (accelerate's ``AcceleratedOptimizer``). ``extra`` is the caller's own
    state, the same on every rank (one copy is written), made of tensors and plain Python
    data; ``load_checkpoint`` returns it. ``path`` appears, or is replaced, only once the new
    checkpoint is complete on disk; an existing ``path`` that is not a checkpoint (nor an
    empty directory) is never replaced.
    """
    path = Path(path)
    opt = _sharded(optimizer)
    module = _unwrap(model)
    ranks = _Ranks(opt)
    names = _param_names(module, opt)
    state: dict[str, Any] = {f"model/{k}": v for k, v in module.state_dict().items()}
    for p, name in names.items():
        for key, t in opt.state.get(p, {}).items():
            state[f"optim/{name}/{key}"] = t if key == "step" else ranks.shard(t, p.numel())
    groups = [
        {**{k: v for k, v in g.items() if k not in ("params", "param_names")}, "params": members}
        for g, members in zip(opt.param_groups, _group_names(opt, names))
    ]
    state["meta"] = _to_bytes({"format": FORMAT, "param_groups": groups})
    state["extra"] = _to_bytes(extra or {})
    tmp, _ = _siblings(path)
    ranks.agree("preparing", lambda: _prepare(path) if ranks.leader else None)
    with _quiet_single_process():
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
    """Load a checkpoint written by ``save_checkpoint`` at any world size. Collective.

    Raises ``CheckpointError``, naming the file or the parameter, when the checkpoint is
    missing, incomplete or corrupt, or when its parameters (names, shapes, dtypes, state
    keys, param groups) differ from ``model``'s and ``optimizer``'s; the model and optimizer are
    then unchanged. Hyperparameters are restored, except how the update runs (``foreach``,
    ``fused``, ...). Returns the ``extra`` dict passed to ``save_checkpoint``.
    """
    opt = _sharded(optimizer)
    module = _unwrap(model)
    ranks = _Ranks(opt)
    names = _param_names(module, opt)
    where = ranks.agree("verifying the files", lambda: _verify(Path(path), ranks))[ranks.index]
    saved = FileSystemReader(where).read_metadata().state_dict_metadata
    model_sd = module.state_dict()
    want: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model_sd.items()}
    for p, name in names.items():
        want.update((f"optim/{name}/{k}", _global(t, p)) for k, t in opt.state.get(p, {}).items())
    _check_tensors(where, saved, want)
    temp: dict[str, Any] = {"meta": b"", "extra": b""}
    temp.update((f"model/{k}", torch.empty_like(v)) for k, v in model_sd.items())
    for p, name in names.items():
        for key, t in opt.state.get(p, {}).items():
            local = torch.empty_like(t)
            temp[f"optim/{name}/{key}"] = local if key == "step" else ranks.shard(local, p.numel())
    with _quiet_single_process():
        dcp.load(
            temp,
            storage_reader=FileSystemReader(where),
            process_group=ranks.group,
            **_no_dist(dcp.load, ranks.distributed),
        )
    meta = _from_bytes(temp["meta"])
    _check_groups(where, meta["param_groups"], _group_names(opt, names))
    module.load_state_dict({k: temp[f"model/{k}"] for k in model_sd})
    with torch.no_grad():
        for p, name in names.items():
            for key, t in opt.state.get(p, {}).items():
                loaded = temp[f"optim/{name}/{key}"]
                t.copy_(loaded.to_local() if isinstance(loaded, DTensor) else loaded)
    for g, sg in zip(opt.param_groups, meta["param_groups"]):
        g.update({k: v for k, v in sg.items() if k not in RUNTIME_KEYS})
    return _from_bytes(temp["extra"])


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether a complete checkpoint can be loaded from ``path`` (local, not collective)."""
    return _find(Path(path)) is not None


# ---- ranks --------------------------------------------------------------------------------


class _Ranks:
    """The optimizer's data-parallel ranks as a checkpoint sees them: the leader, this rank's
    share of per-file work, the process group DCP runs over, and the DTensor placement.

    Construction is collective (one small all-gather, replica-major, of global ranks).
    """

    def __init__(self, opt: ShardedAdamW):
        comm = self.comm = opt._comm
        order = self.order = comm.all_gather_object(comm.global_rank)
        self.size, self.index = len(order), order.index(comm.global_rank)
        self.leader = self.index == 0
        self.distributed = comm.distributed
        self.group = None  # DCP's process group; None is the default group
        self.mesh: DeviceMesh | None = None
        self.placements: tuple = ()
        if not comm.distributed:
            return
        device = next(
            (t.device.type for s in opt.state.values() for k, t in s.items() if k != "step"), "cpu"
        )
        if comm.replicate_group is None:
            self.group = comm.shard_group
            self.mesh = DeviceMesh.from_group(comm.shard_group, device)
            self.placements = (Shard(0),)
            return
        if self.size != dist.get_world_size():
            raise CheckpointError(
                f"checkpoints of a 2-D mesh need the mesh to span the default process group "
                f"({self.size} of {dist.get_world_size()} ranks here)"
            )
        self.mesh = DeviceMesh.from_group(
            [comm.replicate_group, comm.shard_group],
            device,
            mesh=torch.tensor(order).view(comm.replicas, comm.world_size),
            mesh_dim_names=("replicate", "shard"),
        )
        self.placements = (Replicate(), Shard(0))

    def shard(self, local: torch.Tensor, numel: int) -> torch.Tensor:
        """This rank's owned elements of a flat tensor of ``numel`` elements, as DCP should see
        them: a DTensor over the mesh, or the tensor itself in a single process."""
        if self.mesh is None:
            return local
        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=(numel,), stride=(1,)
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
        gathered = self.comm.all_gather_object((result, error))
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
    """Every optimizer parameter's name in the model, in param-group order."""
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


def _global(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A meta tensor with the global shape and dtype of state ``t`` of parameter ``p``."""
    shape = () if t.ndim == 0 else (p.numel(),)
    return torch.empty(shape, dtype=t.dtype, device="meta")


def _describe(key: str) -> str:
    kind, _, rest = key.partition("/")
    if kind == "model":
        return f"model entry {rest!r}"
    name, _, state = rest.rpartition("/")
    return f"optimizer state {state!r} of parameter {name!r}"


def _check_tensors(where: Path, saved: dict, want: dict[str, torch.Tensor]) -> None:
    """Every tensor the model and optimizer need is in the checkpoint with the same shape and
    dtype, and the checkpoint holds no model or optimizer tensor that they lack."""
    problems = []
    for key, t in want.items():
        md = saved.get(key)
        if not isinstance(md, TensorStorageMetadata):
            problems.append(f"{_describe(key)} is not in the checkpoint")
        elif tuple(md.size) != tuple(t.shape) or md.properties.dtype != t.dtype:
            problems.append(
                f"{_describe(key)} is {tuple(md.size)} {md.properties.dtype} in the checkpoint "
                f"and {tuple(t.shape)} {t.dtype} here"
            )
    problems += [
        f"{_describe(key)} is in the checkpoint but not here"
        for key in saved
        if key.startswith(("model/", "optim/")) and key not in want
    ]
    if problems:
        shown = "\n  ".join(problems[:8]) + ("\n  ..." if len(problems) > 8 else "")
        hint = any("'max_exp_avg_sq'" in p or "'master_param'" in p for p in problems)
        raise CheckpointError(
            f"checkpoint {where} does not fit the model and optimizer ({len(problems)} problems"
            + ("; amsgrad and master weights must be as when saved" if hint else "")
            + f"):\n  {shown}"
        )


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
    if (path / MANIFEST).is_file():
        return path
    _, old = _siblings(path)
    if not path.exists() and (old / MANIFEST).is_file():  # a save died between its renames
        return old
    return None


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


def _verify(path: Path, ranks: _Ranks) -> Path:
    """Find the checkpoint, check its manifest's format, and check this rank's share of its
    files (existence, size, sha256). Returns the directory to read."""
    where = _find(path)
    if where is None:
        if path.exists():
            raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete checkpoint")
        raise CheckpointError(f"no checkpoint at {path}")
    manifest = json.loads((where / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where} is a {manifest.get('format')!r} checkpoint, not {FORMAT}")
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
    return where


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
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without a process group; here a single process is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
