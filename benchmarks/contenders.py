"""The contenders: each builds one optimizer setup (DDP + AdamW, ZeroRedundancyOptimizer,
DeepSpeed ZeRO-1/2, FSDP2, ShardedAdamW's modes) around a model and hands back a ``Trainer``
that runs its steps and names the tensors it holds.

Every contender gets the same learning rate and the same two weight-decay groups (0.1 on
matrices, 0 on vectors) for the optimizer that runs the update."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw.core.optimizer import ShardedAdamW

from .counters import tensors_in

LR = 3e-4


def weight_decay_groups(model: nn.Module) -> list[dict]:
    """Weight decay 0.1 on matrices, 0 on vectors: the two groups every contender gets."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]


@dataclass
class Trainer:
    """One contender, ready to train: ``net(x)`` runs forward, ``backward(loss)`` and
    ``step()`` (the optimizer step and zero_grad) the rest; ``held()`` names the tensors it
    keeps: ``params``, ``grads`` (all gradient storage), ``state`` (moments, step counts,
    fp32 master copies) and ``buffers`` (other persistent optimizer buffers)."""

    net: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    held: Callable[[], dict[str, list[torch.Tensor]]]
    optimizer: torch.optim.Optimizer  # the one that runs the update, for its groups


def _ddp(model: nn.Module, device: torch.device) -> DDP:
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _torch_steps(opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        opt.step()
        opt.zero_grad()

    return step


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]


def _plain_held(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], dict]:
    return lambda: {
        "params": list(model.parameters()),
        "grads": [p.grad for p in model.parameters()],
        "state": _state_tensors(opt),
        "buffers": [],
    }


def ddp_adamw(model: nn.Module, device: torch.device) -> Trainer:
    """DDP + torch.optim.AdamW (foreach): the reference."""
    opt = torch.optim.AdamW(weight_decay_groups(model), lr=LR, foreach=True)
    net = _ddp(model, device)
    return Trainer(
        net, lambda loss: loss.backward(), _torch_steps(opt), _plain_held(model, opt), opt
    )


def zero_redundancy(model: nn.Module, device: torch.device) -> Trainer:
    """DDP + ZeroRedundancyOptimizer(AdamW, foreach): whole parameters per rank, DDP's
    all-reduce, then one broadcast per parameter from its owner (its defaults)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    opt = ZeroRedundancyOptimizer(
        weight_decay_groups(model), optimizer_class=torch.optim.AdamW, lr=LR, foreach=True
    )
    net = _ddp(model, device)
    held = lambda: {
        "params": list(model.parameters()),
        "grads": [p.grad for p in model.parameters()],
        "state": _state_tensors(opt.optim),
        "buffers": [],
    }
    return Trainer(net, lambda loss: loss.backward(), _torch_steps(opt), held, opt.optim)


def deepspeed_zero(stage: int) -> Callable[[nn.Module, torch.device], Trainer]:
    """DeepSpeed's ZeRO stage ``stage`` with torch AdamW (foreach) inside; the rest of its
    configuration at DeepSpeed's defaults."""

    def make(model: nn.Module, device: torch.device) -> Trainer:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        config = {
            "train_micro_batch_size_per_gpu": 1,  # only used for its throughput logs
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": LR, "torch_adam": True, "foreach": True},
            },
            "zero_optimization": {"stage": stage},
            "steps_per_print": 2**31 - 1,
        }
        engine, zero, _, _ = deepspeed.initialize(
            model=model, model_parameters=weight_decay_groups(model), config=config
        )
        inner = zero.optimizer
        masters = list(zero.single_partition_of_fp32_groups)
        held = lambda: {
            "params": list(model.parameters()),
            "grads": [p.grad for p in model.parameters()]
            + [p.grad for p in masters]
            + tensors_in(zero.averaged_gradients)
            + tensors_in(zero.grads_in_partition),
            "state": _state_tensors(inner) + masters,
            "buffers": tensors_in(zero.ipg_buckets),
        }
        return Trainer(engine, engine.backward, engine.step, held, inner)

    return make


def fsdp2(model: nn.Module, device: torch.device) -> Trainer:
    """FSDP2: ``fully_shard`` on every block and the root, ``reshard_after_forward=False``
    (parameters stay gathered from forward to backward, as in ZeRO-2), AdamW (foreach)."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=False)
    opt = torch.optim.AdamW(weight_decay_groups(model), lr=LR, foreach=True)
    return Trainer(
        model, lambda loss: loss.backward(), _torch_steps(opt), _plain_held(model, opt), opt
    )


def _sharded_held(model: nn.Module, opt: ShardedAdamW) -> Callable[[], dict]:
    """ShardedAdamW's tensors: state through ``opt.state`` (views of the padded shard
    buffers, so the whole buffers count); the gradient shards and the all-gather pool, which
    no public attribute exposes, from the optimizer's buckets and pool."""
    return lambda: {
        "params": list(model.parameters()),
        "grads": [p.grad for p in model.parameters()] + [b.grad for b in opt.buckets],
        "state": _state_tensors(opt),
        "buffers": opt.staging_buffers(),
    }


def sharded_attached(model: nn.Module, device: torch.device, **options) -> Trainer:
    """ShardedAdamW attached to DDP: DDP's comm hook reduce-scatters (ZeRO-1 memory)."""
    net = _ddp(model, device)
    opt = ShardedAdamW(weight_decay_groups(model), lr=LR, foreach=True, **options)
    opt.attach(net)
    return Trainer(
        net, lambda loss: loss.backward(), _torch_steps(opt), _sharded_held(model, opt), opt
    )


def sharded_attached_view(model: nn.Module, device: torch.device) -> Trainer:
    """ShardedAdamW attached to a DDP built with ``gradient_as_bucket_view=True``."""
    net = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
    opt = ShardedAdamW(weight_decay_groups(model), lr=LR, foreach=True)
    opt.attach(net)
    return Trainer(
        net, lambda loss: loss.backward(), _torch_steps(opt), _sharded_held(model, opt), opt
    )


def sharded_standalone(model: nn.Module, device: torch.device, **options) -> Trainer:
    """ShardedAdamW on its own: gradient hooks reduce-scatter during backward (ZeRO-2)."""
    opt = ShardedAdamW(weight_decay_groups(model), lr=LR, foreach=True, **options)
    return Trainer(
        model, lambda loss: loss.backward(), _torch_steps(opt), _sharded_held(model, opt), opt
    )


def sharded_bf16(model: nn.Module, device: torch.device) -> Trainer:
    """ShardedAdamW standalone on a bf16 copy of the model: bf16 parameters, gradients and
    all-gather, fp32 master weights, state and gradient shards."""
    return sharded_standalone(model.to(torch.bfloat16), device)


CONTENDERS: dict[str, Callable[[nn.Module, torch.device], Trainer]] = {
    "DDP + AdamW": ddp_adamw,
    "DDP + ZeroRedundancyOptimizer": zero_redundancy,
    "DeepSpeed ZeRO-1": deepspeed_zero(1),
    "DeepSpeed ZeRO-2": deepspeed_zero(2),
    "FSDP2 (no reshard after fwd)": fsdp2,
    "ShardedAdamW (attach)": sharded_attached,
    "ShardedAdamW (attach, bucket view)": sharded_attached_view,
    "ShardedAdamW (standalone)": sharded_standalone,
    "ShardedAdamW (attach, overlap_param_gather)": functools.partial(
        sharded_attached, overlap_param_gather=True
    ),
    "ShardedAdamW (standalone, overlap_param_gather)": functools.partial(
        sharded_standalone, overlap_param_gather=True
    ),
    "ShardedAdamW (attach, full_grads)": functools.partial(sharded_attached, full_grads=True),
    "ShardedAdamW (standalone, full_grads)": functools.partial(sharded_standalone, full_grads=True),
    "ShardedAdamW bf16 (standalone)": sharded_bf16,
    "ShardedAdamW (attach, int8 state)": functools.partial(
        sharded_attached, state_dtype=torch.int8
    ),
    "ShardedAdamW (standalone, int8 state)": functools.partial(
        sharded_standalone, state_dtype=torch.int8
    ),
}
