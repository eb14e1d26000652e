"""Run a function on W gloo (or NCCL) processes and collect what each rank returns.

``PATHS`` are the data paths the step-path tests run under: gloo's own, and the one written
for NCCL forced over gloo, so that every NCCL branch runs in CI without a GPU.

Each call spawns fresh processes with a free port and a collective timeout, so a hang becomes
a failure with the rank's traceback. Test modules call it once per world size (through a
module-scoped fixture) and run many scenarios inside one spawn.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp

PATHS = ("gloo", "nccl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, backend, data_path):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["SHARDED_ADAMW_DATA_PATH"] = data_path
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if backend == "nccl":  # one GPU per rank, current before NCCL starts
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        out = fn(rank, world_size, *args)
        dist.barrier()  # no rank tears gloo down while a peer still talks to it
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(
    fn,
    world_size: int,
    *args,
    timeout: float = 240.0,
    backend: str = "gloo",
    data_path: str = "",
) -> list:
    """``[fn(rank, world_size, *args) for each rank]``, computed in ``world_size`` processes
    over ``backend`` (with ``"nccl"``, rank ``r`` runs on ``cuda:r``). ``data_path="nccl"``
    makes ShardedAdamW take the code path written for NCCL over gloo
    (``SHARDED_ADAMW_DATA_PATH``; see ``Comm.gloo_path``)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, fn, args, results, backend, data_path),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    errors.append(
                        f"ranks {dead} died without reporting (exit codes "
                        f"{[procs[r].exitcode for r in dead]})"
                    )
                    break
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(out))
                    errors.append(f"timed out after {timeout}s waiting for ranks {missing}")
                    break
                continue
            if status == "ok":
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]
