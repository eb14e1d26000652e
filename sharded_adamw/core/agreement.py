"""What the ranks agree on before a step, in one small collective: whether any rank's gradient
holds a NaN or inf (the whole step is then skipped everywhere), and which parameters had a
gradient on some rank (``torch.optim.AdamW`` skips a parameter whose ``grad`` is None, so a
parameter unused on every rank must not step, and one used on any rank must step everywhere).

The flags are written into a reusable device buffer by tensor ops and read back once: the
step's only device-to-host synchronisation, and none at all when there is nothing to agree on.
"""

from __future__ import annotations

import torch

from .collectives import Comm


def check_finite(
    shards: list[torch.Tensor], device: torch.device, inv_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """1.0 if this rank's gradient shards hold a NaN or inf, else 0.0 (local). With
    ``inv_scale`` the shards are multiplied by it on the way, as ``GradScaler.unscale_`` does
    to ``p.grad`` (one foreach kernel per device and dtype); without, they are only read: the
    smallest and largest element of each shard (one ``aminmax`` pass, NaN where it holds one)
    are all finite exactly when the shard is. ``aminmax`` reads each element once on every
    device, where a foreach inf-norm falls back on CPU to a slow per-tensor abs-max."""
    found = torch.zeros(1, dtype=torch.float32, device=device)
    by_device: dict = {}
    for shard in shards:
        by_device.setdefault((shard.device, shard.dtype), []).append(shard)
    for (device, _), shards in by_device.items():
        if inv_scale is None:
            ends = torch.stack([end for s in shards for end in torch.aminmax(s)])
            f = ends.isfinite().logical_not().any().float()
        else:
            f = torch.zeros(1, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(shards, f, inv_scale.to(device))
        found += f.to(found.device)
    return found


class StepAgreement:
    """The reusable flags buffer of one optimizer, and the collective that fills it."""

    def __init__(self, comm: Comm):
        self.comm = comm
        self._flags: torch.Tensor | None = None

    def on_device(
        self,
        needs_agreement: bool,
        present: list[list[bool]],
        found: torch.Tensor | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same agreement as ``skip``, left on the device for fused AdamW's ``found_inf``
        (never read on the host): ``(skip, absent)``, ``skip`` a 0-d float (1.0: skip the
        step), ``absent`` one float per parameter in bucket order (1.0: no rank had a
        gradient) or None where ``present`` is already what every rank agrees on."""
        standalone = self.comm.distributed and needs_agreement
        flags = self._fill(present if standalone else None, found, device)
        if self.comm.distributed:
            self.comm.all_reduce_(flags, "max")
        skip = flags[0].clamp(max=1.0)
        return skip, (1.0 - flags[1:]) if standalone else None

    def _fill(
        self,
        present: list[list[bool]] | None,
        found: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """The reusable flags buffer: ``found`` first, then (with ``present``) 1.0 for each
        parameter that had a gradient here."""
        n = 1 + (sum(len(bp) for bp in present) if present is not None else 0)
        if self._flags is None or self._flags.numel() != n:
            self._flags = torch.empty(n, dtype=torch.float32, device=device)
        flags = self._flags
        flags.zero_()
        if found is not None:
            flags[:1].copy_(found.reshape(1))
        if present is not None:
            k = 1
            for bp in present:
                if all(bp):
                    flags[k : k + len(bp)].fill_(1.0)
                else:  # unused parameters: one write each, only in such buckets
                    for j, x in enumerate(bp):
                        if x:
                            flags[k + j].fill_(1.0)
                k += len(bp)
        return flags

    def skip(
        self,
        needs_agreement: bool,
        present: list[list[bool]],
        found: torch.Tensor | None,
        device: torch.device,
    ) -> bool:
        """Whether to skip the step: one all-reduce (max) of whether any rank ``found`` a
        non-finite gradient and (standalone, or attached to a DDP that may skip parameters)
        which parameters had a gradient on some rank, written into ``present``."""
        standalone = needs_agreement
        if not self.comm.distributed:
            return found is not None and found.item() > 0
        if found is None and not standalone:
            return False
        flags = self._fill(present if standalone else None, found, device)
        values = self.comm.all_reduce_(flags, "max").tolist()
        if standalone:
            k = 1
            for bp in present:
                bp[:] = [v > 0 for v in values[k : k + len(bp)]]
                k += len(bp)
        return values[0] > 0
