"""sharded-adamw: AdamW with its state and gradients sharded across data-parallel ranks."""

from .core import registry as _registry
from .core.layout import BucketLayout, ParamSlot, owned_range, plan_buckets, shard_size
from .core.optimizer import ShardedAdamW
from .integrations import install as _install
from .integrations.amp import ShardedGradScaler

__all__ = [
    "BucketLayout",
    "CheckpointError",
    "ParamSlot",
    "ShardedAdamW",
    "ShardedGradScaler",
    "checkpoint_exists",
    "load_checkpoint",
    "owned_range",
    "plan_buckets",
    "shard_size",
    "save_checkpoint",
]
__version__ = "0.1.0"

_CHECKPOINT = ("CheckpointError", "checkpoint_exists", "load_checkpoint", "save_checkpoint")


def __getattr__(name: str):
    """The checkpoint functions load on first use: torch.distributed.checkpoint is slow to
    import, which every other use of the package (the CLI, a single-process run) is spared."""
    if name in _CHECKPOINT:
        from .checkpointing import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Importing changes nothing in torch: the integrations (torch's clipping routed to the shards,
# DDP auto-attach, accelerate) are installed at the first ShardedAdamW construction, and not at
# all with SHARDED_ADAMW_PATCH_TORCH=0 (see integrations/install.py). Only our own callback
# list changes here.
if _install.on_optimizer_built not in _registry.on_optimizer_built:
    _registry.on_optimizer_built.append(_install.on_optimizer_built)
