"""How a bucket stores its shards of AdamW state: as plain tensors (fp32, or bf16 moments),
as blockwise 8-bit codes, and fp32 master weights of bf16 parameters as 16-bit remainders.

Every store answers ``read(lo, hi)``: the elements ``[lo, hi)`` of the shard as an fp32
tensor (a view of the store itself where it is fp32, so the update writes in place and
nothing is copied), and ``write(x, lo, hi)``: store the updated values back (nothing to do
for such a view). The update (``update.update_run``) reads a run of buckets, runs torch's own
AdamW on the fp32 tensors, and writes them back: the math is always torch's, in fp32, and the
fp32 temporaries are as large as one run, never the whole state.

**bf16 moments** are rounded to nearest-even on write.

**Blockwise int8** (``BlockwiseInt8``; Dettmers et al. 2021, "8-bit optimizers via
block-wise quantization"): each block of ``BLOCK`` consecutive elements keeps its absolute
maximum as an fp32 scale and one byte per element, the index of the nearest value of a
256-entry *dynamic map* to ``x / scale``. The map (``dynamic_map``) spends one bit on the sign
(exp_avg; exp_avg_sq is non-negative and uses it for more values), then a decimal exponent
from 1e-6 to 1 and a linear fraction whose resolution grows with the exponent, so that a
block's large and small entries both keep about two significant digits. The bucket layout
starts every quantized parameter and every shard at a multiple of ``BLOCK`` (``layout.py``),
so a block never straddles a parameter or a shard boundary: the blocks, hence the codes,
do not depend on the world size. Quantizing is a nearest search over the map: a 65,536-entry
table indexed by the top 16 bits of the fp32 value gives a code at most one away, and one
comparison with each neighbouring midpoint settles it (exact: the midpoints are further apart
than the values sharing 16 top bits). The kernels are compiled with ``torch.compile`` where
that works (one fused loop instead of ten passes over memory), and give the same bits eager.

**Remainders** (``Remainders``; Megatron-LM's ``store_param_remainders``): a bf16 parameter is
its fp32 master rounded to nearest-even, so the master is the parameter's 16 bits plus the
master's low 16 bits, and one bit more: whether the rounding went up (it did where the low
bits exceed half, did not below half, and at an exact half went to the even neighbour, which
the parameter alone cannot tell: 65,537 fp32 values round to an even bf16 value, too many for
16 bits). Stored: 2 bytes and 1 bit per element instead of 4, bitwise the same masters.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

BLOCK = 256  # elements per int8 block, and the alignment of quantized parameters and shards
MIN_QUANTIZED_NUMEL = 4096  # smaller parameters keep fp32 state (too little to gain)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 values of the dynamic quantization map, sorted, in ``[-1, 1]`` (``signed``) or
    ``[0, 1]``: 0, 1, and for each decade ``10**(e - 6)``, ``e = 0..6``, the centres of
    ``2**e`` (signed; ``2**(e + 1)`` unsigned) equal steps of ``[0.1, 1]`` times it, with
    both signs where signed; then the most negative value becomes -1.

    That last change is ours: the literature's signed map has 1 but not -1, so a block whose
    largest magnitude is negative stores it 0.35% short, and quantizing the values read back
    shrinks the block again. With -1, a block's extreme is stored exactly whatever its sign,
    and quantizing read-back values gives back the same codes and scales: a
    ``state_dict()`` / ``load_state_dict()`` round trip (``copy.deepcopy``, pickling,
    accelerate's ``prepare``) is exact."""
    values = [0.0, 1.0]
    for e in range(7):
        n = 2**e if signed else 2 ** (e + 1)
        step = 0.9 / n
        centres = [(0.1 + step * (k + 0.5)) * 10.0 ** (e - 6) for k in range(n)]
        values += centres + ([-c for c in centres] if signed else [])
    values.sort()
    if signed:
        values[0] = -1.0
    return torch.tensor(values, dtype=torch.float32)


class _Tables:
    """A map on one device with what the nearest search needs."""

    def __init__(self, signed: bool, device: torch.device):
        q = dynamic_map(signed)
        mids = (q[1:] + q[:-1]) / 2
        if not signed:  # a positive exp_avg_sq never rounds to 0 (see ``BlockwiseInt8``)
            mids[0] = torch.finfo(torch.float32).smallest_normal * 2**-23
        inf = torch.tensor([float("inf")])
        self.values = q.to(device)
        self.above = torch.cat([mids, inf]).to(device)  # midpoint above each code
        self.below = torch.cat([-inf, mids]).to(device)  # midpoint below each code
        start = (torch.arange(65536, dtype=torch.int32) << 16).view(torch.float32)
        first = torch.bucketize(start, mids, right=True)  # nearest code of each 16-bit prefix
        self.first = first.masked_fill(start.isnan(), 0).to(torch.int32).to(device)


@functools.cache
def _tables(signed: bool, device: torch.device) -> _Tables:
    return _Tables(signed, device)


def _quantize(
    x: torch.Tensor,
    first: torch.Tensor,
    above: torch.Tensor,
    below: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    blocks = x.view(-1, BLOCK)
    absmax = blocks.abs().amax(1)
    y = (blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]).view(-1)
    c = first[(y.view(torch.int32) >> 16) & 0xFFFF]
    c = c + (y >= above[c]).to(torch.int32) - (y < below[c]).to(torch.int32)
    codes.copy_(c.to(torch.uint8))
    scales.copy_(absmax)


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (values[codes.to(torch.int32)].view(-1, BLOCK) * scales[:, None]).view(-1)


def _join(
    shard: torch.Tensor, low: torch.Tensor, up: torch.Tensor, bit: torch.Tensor
) -> torch.Tensor:
    """fp32 masters from bf16 parameters, their low 16 bits and packed rounded-up bits."""
    high = shard.view(torch.int16).to(torch.int32) & 0xFFFF
    rounded_up = ((up[:, None] & bit) != 0).view(-1).to(torch.int32)
    bits = ((high - rounded_up) << 16) | (low.to(torch.int32) & 0xFFFF)
    return bits.view(torch.float32)


def _split(
    x: torch.Tensor, shard: torch.Tensor, bit: torch.Tensor, low: torch.Tensor, up: torch.Tensor
) -> None:
    """``_join``'s inverse: ``x``'s low bits and rounded-up bits into ``low`` and ``up``
    (zeros where ``shard`` is not ``x`` rounded: the master is then the parameter)."""
    bits = x.view(torch.int32)
    match = x.to(torch.bfloat16).view(torch.int16) == shard.view(torch.int16)
    low.copy_(bits.to(torch.int16) * match)  # integer casts keep the low bits
    high = shard.view(torch.int16).to(torch.int32) & 0xFFFF
    rounded_up = (((bits >> 16) & 0xFFFF) != high) & match
    up.copy_((rounded_up.view(-1, 8).to(torch.uint8) * bit).sum(1))


class _Kernel:
    """``fn`` compiled with ``torch.compile`` (dynamic shapes: one compilation serves every
    bucket), or eager where compiling fails or ``SHARDED_ADAMW_COMPILE=0``; both give the
    same bits (elementwise IEEE and integer operations, a max, table lookups). Compiled, a
    kernel is one loop that allocates only its output."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled: Callable | None = None
        if os.environ.get("SHARDED_ADAMW_COMPILE", "1") != "0":
            self.compiled = torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # no C compiler, an unsupported platform
                warnings.warn(
                    f"ShardedAdamW: torch.compile of the state kernels failed ({e!r:.200}); "
                    "running them eager (same results, slower)",
                    stacklevel=3,
                )
                self.compiled = None
        return self.fn(*args)


@functools.cache
def _kernel(name: str) -> _Kernel:
    kernels = {"quantize": _quantize, "dequantize": _dequantize, "join": _join, "split": _split}
    return _Kernel(kernels[name])


def quantize(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    signed: bool,
    compiled: bool = True,
) -> None:
    """Blockwise 8-bit codes and absmax scales of ``x`` (whole blocks) into ``codes`` and
    ``scales``; ``compiled=False`` runs the eager kernel (the same bits)."""
    t = _tables(signed, x.device)
    kernel = _kernel("quantize") if compiled else _quantize
    kernel(x, t.first, t.above, t.below, codes, scales)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    """The fp32 values that ``codes`` and ``scales`` stand for."""
    return _kernel("dequantize")(codes, scales, _tables(signed, codes.device).values)


class Plain:
    """State kept as a tensor: in the update's dtype (read gives views of it) or in bf16."""

    def __init__(self, data: torch.Tensor, update_dtype: torch.dtype):
        self.data = data
        self.update_dtype = update_dtype

    def read(self, lo: int, hi: int) -> torch.Tensor:
        return self.data[lo:hi].to(self.update_dtype)

    def write(self, x: torch.Tensor, lo: int, hi: int) -> None:
        if x.dtype != self.data.dtype:
            self.data[lo:hi].copy_(x)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"": self.data}

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class BlockwiseInt8:
    """State kept as one byte per element and one fp32 scale per ``BLOCK`` elements.

    Unsigned state (``exp_avg_sq``) rounds a positive value to the smallest positive code
    rather than to 0, which would otherwise be nearer below about 5e-8 of its block's
    maximum. A zero ``exp_avg_sq`` under a nonzero ``exp_avg`` turns the next update into
    ``lr * exp_avg / eps`` (the 8-bit optimizers' hazard for rarely used embedding rows);
    rounded up, it makes that element's step smaller than fp32 state's instead."""

    def __init__(self, numel: int, signed: bool, device):
        if numel % BLOCK:
            raise ValueError(f"an int8 state shard must be whole blocks, got {numel} elements")
        self.codes = torch.zeros(numel, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(numel // BLOCK, dtype=torch.float32, device=device)
        self.signed = signed
        self.update_dtype = torch.float32

    def read(self, lo: int, hi: int) -> torch.Tensor:
        return dequantize(self.codes[lo:hi], self._scales(lo, hi), self.signed)

    def write(self, x: torch.Tensor, lo: int, hi: int) -> None:
        quantize(x, self.codes[lo:hi], self._scales(lo, hi), self.signed)

    def _scales(self, lo: int, hi: int) -> torch.Tensor:
        if lo % BLOCK or hi % BLOCK:
            raise ValueError(f"int8 state is read and written in whole blocks, not [{lo}, {hi})")
        return self.scales[lo // BLOCK : hi // BLOCK]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales}

    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 4


class Remainders:
    """The fp32 master weights of a bf16 shard, kept as the shard's own bits plus 16 low bits
    and one rounded-up bit per element (module docstring). ``write`` must follow the shard's
    own write (the shard is the master rounded to nearest-even)."""

    def __init__(self, shard: torch.Tensor):
        if shard.dtype != torch.bfloat16 or shard.numel() % 8:
            raise ValueError("remainders need a bf16 shard of a multiple of 8 elements")
        self.shard = shard
        self.low = torch.zeros(shard.numel(), dtype=torch.int16, device=shard.device)
        self.up = torch.zeros(shard.numel() // 8, dtype=torch.uint8, device=shard.device)
        self.update_dtype = torch.float32
        self._bit = 2 ** torch.arange(8, dtype=torch.uint8, device=shard.device)

    def read(self, lo: int, hi: int) -> torch.Tensor:
        shard, low, up = self.shard[lo:hi], self.low[lo:hi], self.up[lo // 8 : hi // 8]
        return _kernel("join")(shard, low, up, self._bit)

    def write(self, x: torch.Tensor, lo: int, hi: int) -> None:
        """Store the masters ``x`` of ``[lo, hi)``. Where the shard is not ``x`` rounded (a
        load of masters that the parameters do not match), the master becomes the shard's
        value, as the fp32 path re-seeds a master its parameter was written over."""
        shard, low, up = self.shard[lo:hi], self.low[lo:hi], self.up[lo // 8 : hi // 8]
        _kernel("split")(x, shard, self._bit, low, up)

    def reseed(self, lo: int, hi: int) -> None:
        """Make the masters of ``[lo, hi)`` the shard's values (``lo``, ``hi``: multiples
        of 8), after a write to the parameters outside the optimizer. The fp32 path does so
        only where the master no longer rounds to the parameter; remainders cannot tell (the
        stored bits round to any new value), so a write of the same values resets them too:
        masters then differ from the fp32 path's by under half a bf16 unit."""
        self.low[lo:hi].zero_()
        self.up[lo // 8 : hi // 8].zero_()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"low": self.low, "up": self.up}

    def nbytes(self) -> int:
        return self.low.numel() * 2 + self.up.numel()


Store = Plain | BlockwiseInt8 | Remainders
