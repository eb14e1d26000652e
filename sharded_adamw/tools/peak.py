"""Peak memory of a stretch of training, measured by the system, not by our own accounting.

A user runs out of memory at the peak, so that is what the memory tests, the memory table and
the benchmark report: the most bytes live at any instant between ``reset()`` and ``peak()``,
above what was live at ``reset()``.

- CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's own high-water mark of
  allocated tensor bytes) above ``torch.cuda.memory_allocated`` at the reset.
- CPU: the kernel's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``), reset by
  writing ``5`` to ``/proc/self/clear_refs``, above ``VmRSS`` at the reset. This counts every
  byte the process touches, DDP's C++ buckets and gloo's internal copies included. It follows
  live tensor bytes only when glibc hands large blocks back to the kernel on ``free``: start the
  process with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc reads it at start-up, so it must be in
  the environment before Python starts); without it freed blocks stay resident and the peak
  over-counts. ``PeakMemory`` refuses to measure on CPU without it.
"""

from __future__ import annotations

import os

import torch

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD = "131072"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


class PeakMemory:
    """Peak bytes above the bytes live at the last ``reset()`` on ``device``."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.method = (
            "torch.cuda.max_memory_allocated above memory_allocated at the start"
            if self.device.type == "cuda"
            else f"process VmHWM above VmRSS at the start, {MMAP_ENV}={MMAP_THRESHOLD}"
        )
        if self.device.type == "cpu" and os.environ.get(MMAP_ENV) != MMAP_THRESHOLD:
            raise RuntimeError(
                f"PeakMemory on CPU needs {MMAP_ENV}={MMAP_THRESHOLD} in the environment before "
                "Python starts (so that freed memory leaves the resident set); got "
                f"{os.environ.get(MMAP_ENV)!r}"
            )
        self._base = 0

    def current(self) -> int:
        """Bytes live now (resident bytes on CPU, allocated tensor bytes on CUDA)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024

    def reset(self) -> None:
        """Start a new measurement from what is live now."""
        self.reset_peak()
        self._base = self.current()

    def reset_peak(self) -> None:
        """Forget the peak so far but keep the baseline: the next ``peak()`` counts from here
        what stays live since ``reset()`` plus the new high-water mark (for example, build
        the optimizer, then measure the training steps only)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        """Most bytes live at once since ``reset()``, minus those live at ``reset()``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            high = torch.cuda.max_memory_allocated(self.device)
        else:
            high = _status_kib("VmHWM") * 1024
        return high - self._base
