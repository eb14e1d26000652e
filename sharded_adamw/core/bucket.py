"""One bucket's tensors, and the pool of staging buffers the buckets share.

A ``ShardBucket`` owns the flat buffer its parameters live in (``layout.py``): after
construction every parameter's ``.data`` is a view of it, so the all-gather writes the
parameters in place and the update runs in place on this rank's shard, a contiguous slice of
the same buffer. Beside it the bucket keeps this rank's shards of the AdamW state, of the
averaged gradient and (for low-precision parameters) of the fp32 master weights.
"""

from __future__ import annotations

from array import array

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from .layout import BucketLayout
from .state_formats import BLOCK, BlockwiseInt8, Plain, Remainders, Store

LOW_PRECISION = (torch.float16, torch.bfloat16)
MOMENTS = ("exp_avg", "exp_avg_sq")  # and ``max_exp_avg_sq`` with amsgrad


def as_real(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a complex tensor its real view (``torch.view_as_real``: a trailing
    dimension of 2). A complex parameter lives in its bucket as that view, and its gradient
    and state follow it, as in torch AdamW, which updates complex tensors through it."""
    return torch.view_as_real(t) if t.is_complex() else t


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive places of memory in some order of
    its dimensions (contiguous, channels_last, transposed): no gaps, no overlap."""
    expected = 1
    for stride, n in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return False
        expected *= n
    return True


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter of ``dtype`` has in its bucket (complex: its real part's)."""
    return torch.empty(0, dtype=dtype).real.dtype if dtype.is_complex else dtype


class ShardBucket:
    """This rank's buffers for one bucket: the parameters' flat buffer, and the AdamW state,
    gradient and master-weight shards."""

    def __init__(
        self,
        layout: BucketLayout,
        params: list[torch.nn.Parameter],
        group: dict,
        rank: int,
        master_weights: bool,
        reduce_dtype: torch.dtype | None,
        state_dtype: torch.dtype = torch.float32,
        remainders: bool = False,
    ):
        self.layout = layout
        self.params = params
        self.group = group
        self.rank = rank
        p0 = params[0]
        self.device, self.param_dtype = p0.device, real_dtype(p0.dtype)
        low = self.param_dtype in LOW_PRECISION and master_weights
        self.update_dtype = torch.float32 if low else self.param_dtype
        self.reduce_dtype = reduce_dtype or self.update_dtype
        S = layout.shard_numel
        self.flat = torch.zeros(layout.padded_numel, dtype=self.param_dtype, device=self.device)
        self.shard = self.flat[rank * S : (rank + 1) * S]  # this rank's part, updated in place
        self._ptrs: list[int] = [0] * len(params)
        # Non-contiguous parameters (channels_last, transposed) cannot be views of ``flat``
        # without changing their memory format: they keep their own storage, ``flat`` holds
        # their values in logical (row-major) order like any parameter's, and the values are
        # copied in before an update (``copy_in``, when the parameter was written since) and
        # out after the all-gather (``copy_out``). Slot -> the parameter's ``_version`` when
        # ``flat`` last matched it.
        self.outside: dict[int, int] = {}
        self._versions = [-1] * len(params)
        self.adopt()
        self.master: Store | None = None
        if low and remainders and self.param_dtype == torch.bfloat16:
            self.master = Remainders(self.shard)
        elif low:
            self.master = Plain(self.shard.to(torch.float32, copy=True), torch.float32)
        # fp32 state may be kept smaller (``state_formats``); other update dtypes keep theirs
        self.state_dtype = state_dtype if self.update_dtype == torch.float32 else self.update_dtype
        self.moments: dict[str, Store] = {k: self._store(k) for k in MOMENTS}
        if group["amsgrad"]:
            self.add_max_exp_avg_sq()
        self.grad = torch.zeros(S, dtype=self.update_dtype, device=self.device)  # averaged
        step_device = self.device if group["fused"] else torch.device("cpu")
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=step_device)
        self.first_step = self.steps[0]  # stands for all when they step together
        self.other_steps = self.steps[1:]  # then advanced by one add
        self.present_all = [True] * len(params)
        self._step_counts = array("f", [0.0] * len(params))  # see step_counts()
        self._steps_version = self.steps._version

    def adopt(self) -> None:
        """Make every parameter live in ``flat``: its values are copied in, then its ``.data``
        points at its place (``_own_storage``). Parameters already there are left alone, so
        this also re-adopts parameters given new storage since (``model.double().float()``,
        ``p.data = ...``); a master weight is then re-seeded from the new value. A
        non-contiguous parameter keeps its storage (``outside``)."""
        for i, (p, s) in enumerate(zip(self.params, self.layout.slots)):
            if p.data_ptr() == self._ptrs[i] and p.data_ptr() != 0:
                continue
            if real_dtype(p.dtype) != self.param_dtype or p.device != self.device:
                raise RuntimeError(
                    f"ShardedAdamW: a parameter of shape {tuple(p.shape)} changed from "
                    f"{self.param_dtype} on {self.device} to {p.dtype} on {p.device} after the "
                    "optimizer was built; move or cast the model before constructing it"
                )
            view = self.flat[s.base : s.base + s.numel].view(as_real(p).shape)
            view.copy_(as_real(p.data))
            if p.is_contiguous():
                own = _own_storage(view)
                p.data = torch.view_as_complex(own) if p.is_complex() else own
                self.outside.pop(i, None)
            else:  # keeps its memory format; the bucket holds a copy in logical order
                self.outside[i] = p._version
            self._ptrs[i] = p.data_ptr()
            self._versions[i] = -1  # makes sync_masters compare this parameter

    def copy_in(self) -> None:
        """Copy the non-contiguous parameters written since the last step into ``flat``.
        An in-place write through the parameter bumps its version counter; ``copy_out``
        writes through ``.data``, which does not."""
        for i, version in self.outside.items():
            p = self.params[i]
            if p._version != version:
                s = self.layout.slots[i]
                self.flat[s.base : s.base + s.numel].view(as_real(p).shape).copy_(as_real(p.data))
                self.outside[i] = p._version

    def copy_out(self) -> None:
        """Write the gathered values of the non-contiguous parameters back into them."""
        for i in self.outside:
            p, s = self.params[i], self.layout.slots[i]
            as_real(p.data).copy_(self.flat[s.base : s.base + s.numel].view(as_real(p).shape))

    def adopted(self) -> bool:
        """Whether every parameter still is its view of ``flat`` (one pointer per parameter)."""
        return [p.data_ptr() for p in self.params] == self._ptrs

    def owned(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Slot ``i``'s owned part of a shard-shaped tensor (empty where this rank owns none)."""
        s = self.layout.slots[i]
        return flat[s.offset : s.offset + s.owned]

    def block_range(self, i: int) -> tuple[int, int]:
        """Slot ``i``'s owned part in this rank's shard, widened to whole int8 blocks (the
        blocks past a parameter's end hold only padding)."""
        s = self.layout.slots[i]
        return (s.offset, _round_up(s.offset + s.owned, BLOCK)) if s.owned else (0, 0)

    def param_owned(self, i: int) -> torch.Tensor:
        """This rank's owned elements of parameter ``i`` (a view of the parameter)."""
        return self.owned(self.shard, i)

    def sync_masters(self) -> None:
        """Bring non-contiguous parameters' writes into ``flat`` (``copy_in``), and re-seed the
        master weights of parameters written outside the optimizer since the
        last step (``model.load_state_dict``, DDP's initial broadcast, a re-adopted
        parameter), where the parameter no longer equals its master rounded to the parameter
        dtype: the parameter wins.

        The optimizer's own writes (the update, the all-gather) go through ``flat``, which
        does not bump ``p._version``; any in-place write through the parameter does. A write
        of the same values (resuming from a checkpoint that also restores the masters) keeps
        the fp32 masters. The comparison is decided on the device (``torch.where``), so it
        never waits for it."""
        self.copy_in()
        versions = [p._version for p in self.params]
        if self.master is None or versions == self._versions:
            self._versions = versions
            return
        for i in range(len(self.params)):
            if versions[i] == self._versions[i]:
                continue
            if isinstance(self.master, Remainders):
                s = self.layout.slots[i]
                self.master.reseed(s.offset, _round_up(s.offset + s.owned, 8))
                continue
            master, current = self.owned(self.master.data, i), self.param_owned(i)
            differs = (master.to(self.param_dtype) != current).any()
            master.copy_(torch.where(differs, current, master))
        self._versions = versions

    def step_counts(self) -> array:
        """The step counts of ``steps`` on the host, read without a device sync per step.

        ``steps`` may live on the device (``fused``), so the uniform-step test of the update
        reads this float32 mirror instead; ``advance`` moves both together. Every other
        in-place write to ``steps`` or to one of its views (``load_steps``, checkpoint loading
        through ``opt.state[p]["step"]``, a user's ``opt.state[p]["step"].fill_(n)``) bumps
        the version counter that views share with ``steps``, and the mirror is then read
        back once. A write through ``.data`` bumps no version counter and is not seen (as
        for the parameters in ``sync_masters``)."""
        if self.steps._version != self._steps_version:
            self._step_counts = array("f", self.steps.tolist())
            self._steps_version = self.steps._version
        return self._step_counts

    def uniform(self, present: list[bool]) -> bool:
        """Whether every parameter steps, from the same count: then one step tensor serves the
        whole shard (``steps[0]``; the others follow with ``other_steps``)."""
        counts = self.step_counts()
        return all(present) and counts.count(counts[0]) == len(counts)

    def advanced(self, present: list[bool]) -> None:
        """Record on the host mirror that the present parameters have taken a step.

        The update has just bumped ``steps``' version counter itself, so the mirror must not
        be re-read here (that would count the step twice); ``uniform`` read it before the
        update, which is when an outside write would have been seen."""
        if self.group["fused"]:  # fused may skip on the device: counts unknown here, and
            self._steps_version = -1  # never needed (its runs are per parameter)
            return
        counts = self._step_counts
        for i, ok in enumerate(present):
            if ok:
                counts[i] += 1  # stored as float32, as on the step tensors
        self._steps_version = self.steps._version

    def load_steps(self, counts: list[float]) -> None:
        """Set every slot's step count (one write), keeping the host mirror current."""
        self.steps.copy_(torch.tensor(counts, dtype=torch.float32))
        self._step_counts = array("f", counts)
        self._steps_version = self.steps._version

    def _store(self, key: str) -> Store:
        S = self.layout.shard_numel
        if self.state_dtype == torch.int8:
            return BlockwiseInt8(S, signed=key == "exp_avg", device=self.device)
        data = torch.zeros(S, dtype=self.state_dtype, device=self.device)
        return Plain(data, self.update_dtype)

    def add_max_exp_avg_sq(self) -> None:
        """amsgrad's state (when a group turns amsgrad on, from a load or by hand)."""
        if "max_exp_avg_sq" not in self.moments:
            self.moments["max_exp_avg_sq"] = self._store("max_exp_avg_sq")

    def stores(self) -> dict[str, Store]:
        """The state shards' stores under their state-dict keys."""
        out = dict(self.moments)
        if self.master is not None:
            out["master_param"] = self.master
        return out

    def state_of(self, i: int) -> dict:
        """The ``opt.state`` entry of slot ``i``: live views of this rank's owned elements of
        what is stored: fp32 or bf16 tensors under the state-dict keys; int8 state as
        ``<key>_codes`` (a byte per element) and ``<key>_scales`` (one per block); masters
        kept as remainders as ``master_param_low`` and ``master_param_up`` (packed bits)."""
        s = self.layout.slots[i]
        state = {"step": self.steps[i]}
        for key, store in self.stores().items():
            if isinstance(store, Plain):
                state[key] = self.owned(store.data, i)
                continue
            group = BLOCK if isinstance(store, BlockwiseInt8) else 8
            for part, t in store.tensors().items():
                if t.numel() < self.layout.shard_numel:  # one per ``group`` elements
                    lo, hi = s.offset // group, _round_up(s.offset + s.owned, group) // group
                    state[f"{key}_{part}"] = t[lo:hi]
                else:
                    state[f"{key}_{part}"] = self.owned(t, i)
        return state

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """The state shards under their state-dict keys, in the update's dtype: the stores
        themselves where they are kept so, else values read out of them (temporaries, which
        ``store_buffers`` writes back after a load)."""
        S = self.layout.shard_numel
        return {key: store.read(0, S) for key, store in self.stores().items()}

    def store_buffers(self, bufs: dict[str, torch.Tensor]) -> None:
        """Write ``state_buffers()``' tensors, changed by a load, back into the stores (the
        masters after the shard, which remainders are relative to)."""
        S = self.layout.shard_numel
        for key, store in self.stores().items():
            store.write(bufs[key], 0, S)
        if isinstance(self.master, Remainders):  # relative to the parameters as they are
            self._versions = [p._version for p in self.params]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _own_storage(view: torch.Tensor) -> torch.Tensor:
    """``view``'s memory as a tensor with a storage of its own, exactly its size, which keeps
    the bucket buffer alive (a DLPack round trip: its deleter holds the view).

    A plain view of the bucket would share the bucket's storage with the other parameters:
    ``torch.save`` would then write the whole bucket for a single tensor, and safetensors
    (accelerate's ``save_state``/``load_state``, ``save_model``) refuses or drops tensors
    that do not cover their storage. With a storage per parameter, ``model.state_dict()``
    stays what torch gives (tensors aliasing the live parameters), and the bucket lives as
    long as any of them does."""
    return from_dlpack(to_dlpack(view))
