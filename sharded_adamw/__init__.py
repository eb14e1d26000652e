"""sharded-adamw: AdamW with its state and gradients sharded across data-parallel ranks."""

from .core.layout import BucketLayout, ParamSlot, owned_range, plan_buckets, shard_size
from .core.optimizer import ShardedAdamW
from .integrations.accelerate import install_when_imported
from .integrations.amp import ShardedGradScaler
from .integrations.autoattach import watch_ddp
from .integrations.clip import install as _install_clip_routes

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


install_when_imported()
_install_clip_routes()
watch_ddp()
