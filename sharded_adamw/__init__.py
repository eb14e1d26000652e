"""sharded-adamw: AdamW with its state and gradients sharded across data-parallel ranks."""

from .amp import ShardedGradScaler
from .layout import BucketLayout, ParamSlot, chunk_size, owned_range, plan_buckets
from .optimizer import ShardedAdamW

__all__ = [
    "BucketLayout",
    "ParamSlot",
    "ShardedAdamW",
    "ShardedGradScaler",
    "chunk_size",
    "owned_range",
    "plan_buckets",
]
__version__ = "0.1.0"
