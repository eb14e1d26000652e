"""Side-by-side benchmark: ShardedAdamW against DDP + AdamW and the ZeRO-style peers.

Run from a checkout, under torchrun: ``torchrun --standalone --nproc_per_node 2 -m
benchmarks`` (not installed with the package). Every contender trains
the same GPT-style model from the same weights (a deep copy of one base model) on the same
per-rank batches, with the same learning rate and the same two weight-decay groups (0.1 on
matrices, 0 on vectors) handed to the optimizer that runs the update:

- DDP + ``torch.optim.AdamW`` (foreach): the reference every ratio is taken to.
- DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer`` (AdamW, foreach).
- DeepSpeed ZeRO-1 and ZeRO-2 (torch AdamW, foreach, inside DeepSpeed's ZeRO optimizer; its
  other settings at their defaults). Optional: without ``deepspeed`` the rows say skipped.
- FSDP2 ``fully_shard`` with ``reshard_after_forward=False`` (ZeRO-2-like) + AdamW (foreach).
- ShardedAdamW attached to DDP, standalone, and standalone on a bf16 copy of the model
  (fp32 master weights and state).

On CPU the contenders run interleaved, one step each in turn, so that machine noise hits all
alike; on a GPU each runs alone so that ``torch.cuda.max_memory_allocated`` is its own. After
the measured steps every contender runs one more, unmeasured probe step in which the bytes it
holds are counted from its tensors and the bytes it communicates are counted from the
collectives it dispatches. A contender that is not installed or fails is reported as skipped
with the reason; it never stops the run.

``--gpu-update-bandwidth`` instead times ShardedAdamW's local AdamW update at world size 1
and reports the memory bandwidth it achieves.

The package: ``models`` (what is trained), ``contenders`` (how each setup trains it),
``counters`` (bytes held, sent and copied), ``run`` (the timed side-by-side run),
``peak_memory`` (``--peak-memory``), ``copies`` (``--copy-bytes``), ``profile``
(``--profile``), ``bandwidth``
(``--gpu-update-bandwidth``), ``report`` (tables, notes, chart) and ``command`` (the flags).
"""

from .bandwidth import update_bandwidth
from .command import main, parse_args
from .contenders import CONTENDERS, LR, Trainer, weight_decay_groups
from .counters import CommCounter, collective_bytes, storage_bytes, tensors_in
from .models import GPT, MANY_SMALL, SIZES, ManySmall, Size, mlp
from .peak_memory import PEAK_ROWS, measure_peak, peak_table
from .report import paired_ratio, peak_markdown, plot, ratio_cell, spread, table
from .run import Result, Runner, combine, run_all

__all__ = [
    "CONTENDERS",
    "GPT",
    "LR",
    "MANY_SMALL",
    "PEAK_ROWS",
    "SIZES",
    "CommCounter",
    "ManySmall",
    "Result",
    "Runner",
    "Size",
    "Trainer",
    "collective_bytes",
    "combine",
    "main",
    "measure_peak",
    "mlp",
    "paired_ratio",
    "parse_args",
    "peak_markdown",
    "peak_table",
    "plot",
    "ratio_cell",
    "run_all",
    "spread",
    "storage_bytes",
    "table",
    "tensors_in",
    "update_bandwidth",
    "weight_decay_groups",
]
