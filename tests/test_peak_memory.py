"""Peak memory per rank falls with the world size, measured by the kernel, not by the library.

Each setup trains 3 steps of a 50.4M-parameter fp32 MLP (12 x Linear(2048, 2048)) at W = 4 over
gloo, alone, with the default bucket size; the peak is the process's resident high-water mark
(VmHWM, reset before the steps) above its resident size with the bare model, with glibc's mmap
threshold fixed so that freed memory leaves the resident set (``sharded_adamw.tools.peak``). The
targets are issue 11's, in bytes per parameter (largest rank), W = 4:

- standalone (ZeRO-2) <= 12/W + 2 = 5.0;
- attached to ``DDP(gradient_as_bucket_view=True)`` <= 4 + 12/W + 1.5 = 8.5;
- attached to a default DDP: below DDP + ZeroRedundancyOptimizer in the same run;
- bf16 parameters with fp32 masters, standalone: <= 16/W + 2 = 6.0.

Measured when written: 4.3, 8.3, 8.4 against ZeroRedundancyOptimizer's 11.0, and 5.1.

With smaller state (``state_dtype``, ``master_remainders``; the benchmark's
``PEAK_CONTENDERS``), the targets of the issue that introduced them:

- int8 state, standalone: <= 2.8 (fp32 state: 4.1-4.3);
- int8 state, attached to a default DDP: <= 6.3 (fp32 state: 7.7);
- bf16 parameters with remainder masters and int8 state, standalone: below every peer
  measured here (DDP + AdamW, DDP + ZeroRedundancyOptimizer).

Measured when written: 2.6, 6.2, and 3.3 against 11.0 (3.1 once the remainder arithmetic was compiled). (bf16 state has no target of its
own; the benchmark's table shows it, 3.1.) The three rows cost about 40 s here, 15 of them
compiling the int8 kernels in the warm-up.

``sharded-adamw estimate``'s peak model (``estimate.estimate_peak``, with the same
``state_dtype`` and ``master_remainders``) must predict each of these, and DDP + AdamW's,
within 10%.
"""

from __future__ import annotations

import os

import pytest
import torch

from sharded_adamw.tools.estimate import estimate_peak
from sharded_adamw.tools.peak import MMAP_ENV, MMAP_THRESHOLD

from . import distributed

W = 4
INT8 = "ShardedAdamW (standalone, int8 state)"
INT8_ATTACHED = "ShardedAdamW (attach, int8 state)"
REMAINDERS_INT8 = "ShardedAdamW (standalone, int8 state, master remainders)"
ROWS = [
    ("DDP + AdamW", torch.float32),
    ("DDP + ZeroRedundancyOptimizer", torch.float32),
    ("ShardedAdamW (attach)", torch.float32),
    ("ShardedAdamW (attach, bucket view)", torch.float32),
    ("ShardedAdamW (standalone)", torch.float32),
    ("ShardedAdamW (standalone)", torch.bfloat16),
    ("ShardedAdamW (attach)", torch.bfloat16),
    (INT8, torch.float32),
    (INT8_ATTACHED, torch.float32),
    (REMAINDERS_INT8, torch.bfloat16),
]


def _peaks(rank: int, world: int) -> dict:
    from benchmarks import measure_peak, mlp

    g = torch.Generator().manual_seed(rank)
    cpu = torch.device("cpu")
    tiny, warm = mlp(64, 2), [torch.randn(8, 64, generator=g)]
    for n, d in ROWS:  # one-time imports (torch._dynamo, ~150 MB) must not count as a peak
        measure_peak(n, d, tiny, warm, cpu)
    base = mlp(2048, 12)
    batches = [torch.randn(8, 2048, generator=g) for _ in range(3)]
    return {(n, d): measure_peak(n, d, base, batches, cpu) for n, d in ROWS}


@pytest.fixture(scope="module")
def peaks() -> dict:
    old = os.environ.get(MMAP_ENV)
    os.environ[MMAP_ENV] = MMAP_THRESHOLD  # read by glibc when each spawned rank starts
    try:
        return distributed.run(_peaks, W, timeout=500)[0]
    finally:
        if old is None:
            del os.environ[MMAP_ENV]
        else:
            os.environ[MMAP_ENV] = old


def _value(peaks: dict, name: str, dtype: torch.dtype = torch.float32) -> float:
    value = peaks[(name, dtype)]
    assert isinstance(value, float), f"{name} was skipped: {value}"
    return value


def test_standalone_peak_is_at_most_12_over_w_plus_2_bytes_per_parameter(peaks):
    assert _value(peaks, "ShardedAdamW (standalone)") <= 12 / W + 2, peaks


def test_attached_to_a_bucket_view_ddp_peak_is_at_most_4_plus_12_over_w_plus_1_5(peaks):
    assert _value(peaks, "ShardedAdamW (attach, bucket view)") <= 4 + 12 / W + 1.5, peaks


def test_attached_to_a_default_ddp_peaks_below_zero_redundancy_optimizer(peaks):
    zero = _value(peaks, "DDP + ZeroRedundancyOptimizer")
    assert _value(peaks, "ShardedAdamW (attach)") < zero, peaks


def test_bf16_standalone_with_fp32_masters_peak_is_at_most_16_over_w_plus_2(peaks):
    assert _value(peaks, "ShardedAdamW (standalone)", torch.bfloat16) <= 16 / W + 2, peaks


def test_int8_state_standalone_peak_is_at_most_2_8_bytes_per_parameter(peaks):
    assert _value(peaks, INT8) <= 2.8, peaks


def test_int8_state_attached_peak_is_at_most_6_3_bytes_per_parameter(peaks):
    assert _value(peaks, INT8_ATTACHED) <= 6.3, peaks


def test_bf16_with_remainders_and_int8_state_peaks_below_every_peer(peaks):
    ours = _value(peaks, REMAINDERS_INT8, torch.bfloat16)
    for peer in ("DDP + AdamW", "DDP + ZeroRedundancyOptimizer"):
        assert ours < _value(peaks, peer), (peer, peaks)


def test_peak_memory_refuses_to_measure_cpu_without_the_mmap_threshold(monkeypatch):
    from sharded_adamw.tools.peak import PeakMemory

    monkeypatch.delenv(MMAP_ENV, raising=False)
    with pytest.raises(RuntimeError, match=MMAP_ENV):
        PeakMemory("cpu")


@pytest.mark.parametrize(
    "name, dtype, setup",
    [
        ("DDP + AdamW", torch.float32, "ddp"),
        ("ShardedAdamW (attach)", torch.float32, "attached"),
        ("ShardedAdamW (attach, bucket view)", torch.float32, "attached"),
        ("ShardedAdamW (standalone)", torch.float32, "standalone"),
        ("ShardedAdamW (standalone)", torch.bfloat16, "standalone"),
        ("ShardedAdamW (attach)", torch.bfloat16, "attached"),
    ],
)
def test_the_estimator_predicts_the_measured_peak_within_10_percent(peaks, name, dtype, setup):
    sizes = {2048 * 2048: 12, 2048: 12}
    est = estimate_peak(
        sizes, W, {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype], backend="gloo"
    )
    measured = _value(peaks, name, dtype)
    assert abs(est[setup].per_param - measured) <= 0.10 * measured, (est[setup], measured)


@pytest.mark.parametrize(
    "name, dtype",
    [
        (INT8, torch.float32),
        (INT8_ATTACHED, torch.float32),
        (REMAINDERS_INT8, torch.bfloat16),
    ],
)
def test_the_estimator_predicts_the_peak_with_smaller_state_within_10_percent(peaks, name, dtype):
    """What the benchmark prints beside each of these rows (``peak_estimate``: the model's
    own param groups, the contender's options)."""
    from benchmarks import mlp
    from benchmarks.peak_memory import peak_estimate

    with torch.device("meta"):  # shapes only
        base = mlp(2048, 12)
    est = peak_estimate(name, dtype, base, W, "gloo")
    measured = _value(peaks, name, dtype)
    assert abs(est - measured) <= 0.10 * measured, (name, est, measured)
