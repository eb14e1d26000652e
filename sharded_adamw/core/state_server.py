"""``state_dict()`` from any subset of ranks: every rank serves its state shards to callers.

A torch-format state dict needs every rank's shard, but training code often asks for it on one
rank only (``if rank == 0: torch.save(opt.state_dict())``) while the other ranks train on. A
collective there hangs or mismatches the next training collective. So the state never travels
over the training group: at construction each rank opens a ``SideChannel`` (a private CPU gloo
group and a store mailbox) and starts a daemon thread that answers requests for its shards.

Protocol, for a caller ``c`` (any number of callers, at any time, in any order):

1. ``c`` visits the other shard ranks one at a time. For server ``s`` it posts
   ``"c k nbuckets loads"`` to ``s``'s mailbox, where ``k`` is ``c``'s count of steps that
   began updating the state (``updates_started``) and ``loads`` its count of finished state
   loads (``load_state_dict``, ``load_checkpoint``); ``s`` first waits, bounded, until it has
   begun as many steps and finished as many loads.
2. ``s``'s thread takes requests in mailbox order. Holding the optimizer's state lock it sends
   a header ``[status, s's updates_started, elements it would send]``; if the status is good it
   waits for ``c``'s go (``c`` checks the header against its own count and layout), then sends
   every bucket's state shards, bucket by bucket, straight from the live buffers (no copy on
   CPU), and releases the lock.
3. ``c`` scatters each received shard into the per-parameter CPU tensors it returns, so it
   holds the result plus one shard at a time; servers hold nothing extra.

Why it never hangs: a server waits only on the caller it is serving, and that caller is waiting
only on that server, because a caller posts its request to ``s`` when it starts on ``s`` (a
server's queue never holds a request whose caller is busy elsewhere). Nothing in it waits on a
training collective, and every wait on a peer is bounded by ``timeout`` seconds; a server that
has died or does not answer in time is named in the error.

Why the state is the one after the last completed step on every rank: ``step()`` increments
``updates_started`` under the state lock just before it modifies any state, after the step's
agreement all-reduce (standalone, or ``skip_nonfinite``): a rank can only be past that point
once every rank, the caller included, has entered the same step, and a caller inside
``state_dict()`` has not. Reaching ``step()``'s updates therefore proves no request for the
previous step is still pending; a server mid-answer holds the lock, so its own ``step()``
waits for the answer to finish. Where a step has no agreement all-reduce (attached with
``skip_nonfinite=False``) and the caller asks between its backward and its step, a server may
already be updating: it answers that it is ahead and the caller raises, instead of returning a
mix of two steps.

Shutdown: the thread holds only a weak reference to the optimizer; dropping the optimizer, or
interpreter exit (an ``atexit`` hook registered on import, so it runs before torch's own), posts
``"stop"`` to the thread's own mailbox and joins it. If the store is gone (the job is ending),
the thread's wait fails and it returns.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from .bucket import as_real
from .collectives import Comm, SideChannel

if TYPE_CHECKING:
    from .optimizer import ShardBucket, ShardedAdamW

logger = logging.getLogger("sharded_adamw")

OK, AHEAD, BEHIND, LAYOUT = 0, 1, 2, 3
_servers: weakref.WeakSet[StateServer] = weakref.WeakSet()

BuffersOf = Callable[["ShardBucket"], dict[str, torch.Tensor]]


class StateServer:
    """This rank's half of ``state_dict()`` on any subset of ranks (see the module docstring).

    ``lock`` and ``updates_started`` are shared with ``ShardedAdamW.step()`` and
    ``load_state_dict()``; ``gather`` is the caller's side, the thread the server's.
    """

    def __init__(self, opt: ShardedAdamW, comm: Comm, buffers_of: BuffersOf, timeout: float):
        self.lock = threading.Lock()
        self.updates_started = 0
        self.loads = 0  # state loads this rank has finished (every rank makes the same ones)
        self.timeout = timeout
        self._channel = SideChannel(comm, timeout, opt.object_device)
        self._buffers_of = buffers_of
        self._broken: str | None = None
        self._thread = threading.Thread(
            target=self._serve_forever,
            args=(weakref.ref(opt),),
            name=f"sharded_adamw-state-server-{comm.global_rank}",
            daemon=True,
        )
        self._thread.start()
        weakref.finalize(opt, self.close).atexit = False
        _servers.add(self)

    # ---- the caller's side -----------------------------------------------------------------

    def gather(self, buckets: list[ShardBucket]) -> Iterator[tuple[int, int, str, torch.Tensor]]:
        """Every shard of every bucket's state, as ``(rank, bucket index, key, shard)`` with
        the shard on the CPU; this rank's own first, then one server at a time. The shard is
        only valid until the next item is produced."""
        if self._broken is not None:
            raise RuntimeError(
                "ShardedAdamW.state_dict(): the state side channel failed earlier and cannot be "
                f"used again in this process ({self._broken})"
            )
        ch = self._channel
        for bi, b in enumerate(buckets):
            for key, t in self._buffers_of(b).items():
                yield ch.rank, bi, key, t.detach().to("cpu")
        for step in range(1, ch.size):
            s = (ch.rank + step) % ch.size
            try:
                yield from self._receive_from(s, buckets)
            except _ServerError:
                raise
            except Exception as e:  # a closed connection or a timeout: name the rank
                self._broken = f"rank {ch.ranks[s]}: {e}"
                raise TimeoutError(
                    f"ShardedAdamW.state_dict(): rank {ch.ranks[s]} did not serve its state "
                    f"shard within {self.timeout:g} s (state_dict_timeout): it has died, hangs "
                    f"with its server thread stopped, or the connection failed ({e})"
                ) from e

    def _receive_from(
        self, s: int, buckets: list[ShardBucket]
    ) -> Iterator[tuple[int, int, str, torch.Tensor]]:
        ch = self._channel
        want = self.updates_started
        expected = sum(t.numel() for b in buckets for t in self._buffers_of(b).values())
        ch.post(s, f"{ch.rank} {want} {len(buckets)} {self.loads}")
        header = torch.empty(3, dtype=torch.int64)
        ch.wait(ch.recv(header, s, SideChannel.TO_CALLER))
        status, theirs, total = header.tolist()
        go = status == OK and total == expected
        if status == OK:
            ch.wait(ch.send(torch.tensor([int(go)]), s, SideChannel.TO_SERVER))
        if not go:
            raise _ServerError(_refusal(ch.ranks[s], status, theirs, want, total, expected))
        for bi, b in enumerate(buckets):
            for key, t in self._buffers_of(b).items():
                row = torch.empty(t.numel(), dtype=t.dtype)
                ch.wait(ch.recv(row, s, SideChannel.TO_CALLER))
                yield s, bi, key, row

    # ---- the server's side ------------------------------------------------------------------

    def _serve_forever(self, opt_ref: weakref.ref) -> None:
        ch = self._channel
        n = 0
        while True:
            n += 1
            try:
                message = ch.take(n)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return
            if message == "stop":
                return
            caller, want, nbuckets, loads = map(int, message.split())
            opt = opt_ref()
            if opt is None:
                return
            try:
                self._answer(opt, caller, want, nbuckets, loads)
            except Exception as e:  # noqa: BLE001 - the caller raises; keep serving others
                logger.warning(
                    "ShardedAdamW: serving state to rank %d failed: %s", ch.ranks[caller], e
                )
            del opt

    def _answer(self, opt, caller: int, want: int, nbuckets: int, loads: int) -> None:
        ch = self._channel
        deadline = time.monotonic() + self.timeout
        while (
            self.updates_started < want or self.loads < loads or len(opt.buckets) < nbuckets
        ) and time.monotonic() < deadline:
            # the caller's step, load or add_param_group finished first; ours is under way
            # (``opt.buckets`` is read afresh: a bucket list of its own each time)
            time.sleep(0.01)
        with self.lock:
            buckets = opt.buckets
            have = self.updates_started
            status = OK if have == want else AHEAD if have > want else BEHIND
            if status == OK and nbuckets != len(buckets):
                status = LAYOUT
            total = sum(t.numel() for b in buckets for t in self._buffers_of(b).values())
            header = torch.tensor([status, have, total if status != LAYOUT else len(buckets)])
            ch.wait(ch.send(header, caller, SideChannel.TO_CALLER))
            if status != OK:
                return
            go = torch.zeros(1, dtype=torch.int64)
            ch.wait(ch.recv(go, caller, SideChannel.TO_SERVER))
            if not go.item():
                return
            for b in buckets:
                for t in self._buffers_of(b).values():
                    ch.wait(ch.send(t.detach().to("cpu").contiguous(), caller, ch.TO_CALLER))

    def close(self) -> None:
        """Stop the serving thread (idempotent; safe at interpreter exit)."""
        if not self._thread.is_alive():
            return
        try:
            self._channel.post(self._channel.rank, "stop")
        except Exception:  # noqa: BLE001 - the store is gone, so is the thread's wait
            pass
        self._thread.join(timeout=5.0)


class _ServerError(RuntimeError):
    """A server answered but refused (different step or layout): the channel stays usable."""


def _refusal(rank: int, status: int, theirs: int, want: int, total: int, expected: int) -> str:
    if status == AHEAD:
        return (
            f"ShardedAdamW.state_dict(): rank {rank} has already begun updating step "
            f"{theirs} while this rank asks for the state after step {want}; call state_dict() "
            "after optimizer.step() and before the next backward (with an attached optimizer "
            "and skip_nonfinite=False nothing else keeps ranks from updating ahead)"
        )
    if status == BEHIND:
        return (
            f"ShardedAdamW.state_dict(): rank {rank} has begun {theirs} steps, this rank {want}: "
            "the ranks skipped different steps"
        )
    if status == LAYOUT:
        return (
            f"ShardedAdamW.state_dict(): rank {rank} has {total} buckets of state, this rank "
            "a different number: add_param_group() was not called on every rank"
        )
    return (
        f"ShardedAdamW.state_dict(): rank {rank} holds {total} state elements, this rank "
        f"expects {expected}: the optimizers differ between ranks"
    )


def state_entries(
    buckets: list[ShardBucket], buffers_of: BuffersOf, server: StateServer | None
) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
    """Every parameter's full-shape state on the CPU, in ``torch.optim.AdamW``'s entry format,
    for the parameters that have been updated (torch creates state at the first update).

    Built by scattering one shard at a time into the returned tensors: the caller holds the
    result plus one shard, whatever the world size."""
    entries: list[dict[int, dict[str, torch.Tensor]]] = []
    for b in buckets:
        steps = b.steps.tolist()
        bufs = buffers_of(b)
        bucket_entries = {}
        for i, p in enumerate(b.params):
            if steps[i] == 0:
                continue
            entry = {"step": b.steps[i].detach().to("cpu", copy=True)}
            for key, t in bufs.items():  # filled through its real view if complex
                entry[key] = torch.empty(p.shape, dtype=_state_dtype(p, t))
            bucket_entries[i] = entry
        entries.append(bucket_entries)
    if server is None:
        shards = (
            (0, bi, key, t.detach().to("cpu"))
            for bi, b in enumerate(buckets)
            for key, t in buffers_of(b).items()
        )
    else:
        shards = server.gather(buckets)
    for rank, bi, key, shard in shards:
        layout = buckets[bi].layout
        for i, entry in entries[bi].items():
            lo, hi = layout.ranges(i)[rank]
            if hi > lo:  # where that rank's shard holds the range: see layout.py
                at = layout.slots[i].base + lo - rank * layout.shard_numel
                as_real(entry[key]).view(-1)[lo:hi].copy_(shard[at : at + hi - lo])
    return {b.params[i]: e for b, be in zip(buckets, entries) for i, e in be.items()}


def _state_dtype(p: torch.Tensor, shard: torch.Tensor) -> torch.dtype:
    """The dtype of a state entry of ``p`` held in ``shard``: complex for a complex ``p``."""
    if not p.is_complex():
        return shard.dtype
    return torch.view_as_complex(torch.empty(2, dtype=shard.dtype)).dtype


def _stop_all() -> None:
    for server in list(_servers):
        server.close()


atexit.register(_stop_all)
