"""Issue 5: checkpoints that survive anything.

- Resharding: a checkpoint saved at W ranks loads at W' (2->3, 3->2, 4->1, 1->4, and a 2x2
  mesh -> 3). The reference is the torch-format path: the same first ``K`` steps at W are
  carried to W' once through ``save_checkpoint`` / ``load_checkpoint`` and once through
  ``ShardedAdamW.state_dict()`` / ``load_state_dict()`` (full tensors; checked against
  ``torch.optim.AdamW`` in test_equivalence), and both continue to ``STEPS`` at W'. The claim is
  bitwise, right after the load and after training: DCP only moves bytes, and both copies then
  run the same update at the same W'. An uninterrupted run is no reference here, because W'
  ranks read other batches than W ranks. At the same world size the resumed run is compared
  with the uninterrupted one, bitwise.
- Atomic: rank 1 is SIGKILLed halfway through writing its part of a save, and the previous
  checkpoint at ``path`` still verifies and loads; the next save cleans up.
- Verified: other names or shapes, other state keys or param groups, missing, truncated and
  corrupt files each raise ``CheckpointError`` naming the parameter or the file, and leave the
  model and optimizer unchanged.
- Elastic: ``examples/elastic_train.py`` under torchrun with a rank killed mid-run ends with
  the parameters of a run without the crash.
- accelerate: ``Accelerator.save_state`` / ``load_state`` resume ``ShardedAdamW`` bitwise.

Each group of checks runs in one spawn (tests/distributed.py); subgroups let one spawn of 3 or
4 processes play both world sizes of a resharding.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

import sharded_adamw.checkpointing.checkpoint
from sharded_adamw import ShardedAdamW
from sharded_adamw.checkpointing.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from . import distributed
from .models import TinyLM, batch, loss_fn, param_groups, schedule

ROOT = Path(__file__).resolve().parents[1]
K, STEPS = 3, 6

RESHARD = {
    "2->3 amsgrad": dict(world=3, w_from=2, w_to=3, opt=dict(amsgrad=True)),
    "3->2 bf16 master weights": dict(world=3, w_from=3, w_to=2, dtype=torch.bfloat16),
    "1->4": dict(world=4, w_from=1, w_to=4),
    "4->1": dict(world=4, w_from=4, w_to=1),
    "2x2 mesh->3": dict(world=4, w_from=4, w_to=3, mesh=True),
}


def _make(seed: int, group, dtype=torch.float32, lr: float = 1e-2, **opt_kwargs):
    torch.manual_seed(seed)
    model = TinyLM().to(dtype)
    return model, ShardedAdamW(param_groups(model, lr=lr), process_group=group, **opt_kwargs)


def _train(model: nn.Module, opt, steps: range, rank: int, sched=None) -> None:
    """Standalone (or DDP-attached) training; the branch is skipped on some steps, so its
    parameters' step counts lag the others' inside the same bucket."""
    for step in steps:
        x, y = batch(step, rank)
        loss_fn(model(x, use_branch=step % 3 != 1), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def _params_differ(a: nn.Module, b: nn.Module) -> list[str]:
    return [n for (n, p), q in zip(a.named_parameters(), b.parameters()) if not torch.equal(p, q)]


def _state_differs(model: nn.Module, ref_opt, opt) -> list[str]:
    """This rank's state of ``opt`` (over ``model``) against ``ref_opt``'s (same world size and
    param groups), key by key."""
    names = {p: n for n, p in model.named_parameters()}
    out = []
    for p, q in zip(_params(opt), _params(ref_opt)):
        mine, theirs = opt.state.get(p, {}), ref_opt.state.get(q, {})
        if mine.keys() != theirs.keys():
            out.append(f"{names[p]}: keys {sorted(mine)} vs {sorted(theirs)}")
        out += [
            f"{names[p]}/{k}" for k in mine if k in theirs and not torch.equal(mine[k], theirs[k])
        ]
    return out


def _params(opt) -> list:
    return [p for g in opt.param_groups for p in g["params"]]


def _snapshot(model: nn.Module, opt) -> list[torch.Tensor]:
    state = [t.clone() for p in _params(opt) for t in opt.state.get(p, {}).values()]
    return [p.detach().clone() for p in model.parameters()] + state


def _unchanged(before: list[torch.Tensor], model: nn.Module, opt) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt)))


# ---- resharding -----------------------------------------------------------------------------


def _reshard(rank: int, tmp: Path, name: str, cfg: dict) -> dict:
    """Train K steps on ranks [0, w_from), save both ways; load both ways on ranks [0, w_to),
    compare, train to STEPS, compare again."""
    w_from, w_to = cfg["w_from"], cfg["w_to"]
    dtype, kw = cfg.get("dtype", torch.float32), cfg.get("opt", {})
    groups = {w: dist.new_group(list(range(w))) for w in sorted({w_from, w_to})}
    source = groups[w_from]
    if cfg.get("mesh"):
        source = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    path = tmp / name.replace(" ", "_").replace(">", "")
    torch_format = path.with_suffix(".pt")
    if rank < w_from:
        model, opt = _make(0, source, dtype, **kw)
        _train(model, opt, range(K), rank)
        save_checkpoint(path, model, opt, extra={"step": K, "from": w_from})
        full = opt.state_dict()
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": full}, torch_format)
    dist.barrier()
    out: dict = {}
    if rank < w_to:
        ref_model, ref_opt = _make(1, groups[w_to], dtype, lr=0.5, **kw)
        saved = torch.load(torch_format)
        ref_model.load_state_dict(saved["model"])
        ref_opt.load_state_dict(saved["opt"])
        model, opt = _make(2, groups[w_to], dtype, lr=0.5, **kw)
        out["extra"] = load_checkpoint(path, model, opt)
        out["lr"] = [g["lr"] for g in opt.param_groups]
        out["loaded"] = _params_differ(ref_model, model) + _state_differs(model, ref_opt, opt)
        out["steps"] = sorted({s["step"].item() for s in opt.state.values()})
        out["owned"] = sum(s["exp_avg"].numel() for s in opt.state.values())
        _train(ref_model, ref_opt, range(K, STEPS), rank)
        _train(model, opt, range(K, STEPS), rank)
        out["trained"] = _params_differ(ref_model, model) + _state_differs(model, ref_opt, opt)
    dist.barrier()
    return out


def _reshard_all(rank: int, world: int, tmp: str) -> dict:
    return {
        name: _reshard(rank, Path(tmp), name, cfg)
        for name, cfg in RESHARD.items()
        if cfg["world"] == world
    }


@pytest.fixture(scope="module")
def resharded(tmp_path_factory) -> dict[str, list[dict]]:
    """Each scenario's results on the ranks that loaded (one spawn of 3, one of 4)."""
    tmp = tmp_path_factory.mktemp("reshard")
    out: dict[str, list[dict]] = {}
    for world in sorted({cfg["world"] for cfg in RESHARD.values()}):
        per_rank = distributed.run(_reshard_all, world, str(tmp), timeout=150)
        for name, cfg in RESHARD.items():
            if cfg["world"] == world:
                out[name] = [r[name] for r in per_rank[: cfg["w_to"]]]
    return out


@pytest.mark.parametrize("scenario", RESHARD)
def test_load_at_another_world_size_gives_the_torch_format_state_bitwise(resharded, scenario):
    for rank, r in enumerate(resharded[scenario]):
        assert r["loaded"] == [], f"rank {rank}: differs after load: {r['loaded']}"
        assert r["steps"] == [K - 1, K], "the skipped branch must lag: steps are per parameter"
    total = sum(r["owned"] for r in resharded[scenario])
    assert total == sum(p.numel() for p in TinyLM().parameters() if p.requires_grad)


@pytest.mark.parametrize("scenario", RESHARD)
def test_training_continues_bitwise_as_through_the_torch_format_path(resharded, scenario):
    for rank, r in enumerate(resharded[scenario]):
        assert r["trained"] == [], f"rank {rank}: differs after training: {r['trained']}"


@pytest.mark.parametrize("scenario", RESHARD)
def test_hyperparameters_and_extra_are_restored(resharded, scenario):
    for r in resharded[scenario]:
        assert r["lr"] == [1e-2, 1e-2 / 2]  # saved lr, not the loading optimizer's 0.5
        assert r["extra"] == {"step": K, "from": RESHARD[scenario]["w_from"]}


# ---- same world size, errors, accelerate (one spawn of 2) ----------------------------------


def _resume_same_world(rank: int, tmp: Path) -> dict:
    """DDP-attached, with an LR schedule carried in ``extra``: save at K, resume in fresh
    objects, against the uninterrupted run."""

    def fresh(seed: int):
        model, opt = _make(seed, None)
        net = DDP(model, find_unused_parameters=True)
        opt.attach(net)
        return model, net, opt, schedule(opt)

    model, net, opt, sched = fresh(0)
    _train(net, opt, range(K), rank, sched)
    save_checkpoint(tmp / "same", net, opt, extra={"step": K, "sched": sched.state_dict()})
    _train(net, opt, range(K, STEPS), rank, sched)
    model2, net2, opt2, sched2 = fresh(3)
    extra = load_checkpoint(tmp / "same", net2, opt2)
    sched2.load_state_dict(extra["sched"])
    _train(net2, opt2, range(extra["step"], STEPS), rank, sched2)
    return {"differ": _params_differ(model, model2) + _state_differs(model2, opt, opt2)}


def _errors(rank: int, tmp: Path) -> dict:
    """Each bad load raises CheckpointError on every rank and changes nothing."""
    model, opt = _make(0, None)
    _train(model, opt, range(K), rank)
    good = tmp / "good"
    save_checkpoint(good, model, opt)

    def copy_then(name: str, damage) -> Path:
        bad = tmp / name
        if rank == 0:
            shutil.copytree(good, bad)
            damage(bad)
        dist.barrier()
        return bad

    def truncate(d: Path) -> None:
        f = d / "__0_0.distcp"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def flip_a_byte(d: Path) -> None:
        f = d / "__1_0.distcp"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    def one_group(m: nn.Module) -> ShardedAdamW:
        return ShardedAdamW(m.parameters())

    def swapped_groups(m: nn.Module) -> ShardedAdamW:
        return ShardedAdamW(param_groups(m)[::-1])

    paths = {
        "missing file": copy_then("missing", lambda d: (d / "__1_0.distcp").unlink()),
        "truncated file": copy_then("truncated", truncate),
        "corrupt file": copy_then("corrupt", flip_a_byte),
        "no manifest": copy_then("no_manifest", lambda d: (d / "manifest.json").unlink()),
        "no checkpoint": tmp / "nothing_here",
    }
    targets = {
        "renamed": (lambda: nn.Sequential(TinyLM()), lambda m: ShardedAdamW(param_groups(m))),
        "reshaped": (lambda: TinyLM(hidden=31), lambda m: ShardedAdamW(param_groups(m))),
        "amsgrad": (TinyLM, lambda m: ShardedAdamW(param_groups(m), amsgrad=True)),
        "one param group": (TinyLM, one_group),
        "swapped param groups": (TinyLM, swapped_groups),
    }
    out = {}
    for case in [*paths, *targets]:
        torch.manual_seed(7)
        make_model, make_opt = targets.get(case, (TinyLM, lambda m: ShardedAdamW(param_groups(m))))
        target = make_model()
        target_opt = make_opt(target)
        _train(target[0] if case == "renamed" else target, target_opt, range(1), rank)
        before = _snapshot(target, target_opt)
        try:
            load_checkpoint(paths.get(case, good), target, target_opt)
            out[case] = {"error": None}
        except CheckpointError as e:
            out[case] = {"error": str(e), "unchanged": _unchanged(before, target, target_opt)}
    keep = tmp / "not_a_checkpoint"
    if rank == 0:
        keep.mkdir()
        (keep / "notes.txt").write_text("mine")
    dist.barrier()
    try:
        save_checkpoint(keep, model, opt)
        out["save over a non-checkpoint"] = {"error": None}
    except CheckpointError as e:
        kept = (keep / "notes.txt").read_text() == "mine"
        out["save over a non-checkpoint"] = {"error": str(e), "unchanged": kept}
    return out


def _accelerate(rank: int, tmp: Path) -> dict:
    """save_state at K, then: the same run continued; fresh prepared objects + load_state;
    fresh prepared objects + load_checkpoint (sharded path through the wrappers)."""
    os.environ["ACCELERATE_USE_CPU"] = "1"
    from accelerate import Accelerator, DistributedDataParallelKwargs

    def prepared(seed: int):
        acc = Accelerator(
            cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
        )
        model, opt = _make(seed, None)
        net, acc_opt = acc.prepare(model, opt)
        return acc, model, net, acc_opt

    acc, model, net, acc_opt = prepared(0)
    _train(net, acc_opt, range(K), rank)
    acc.save_state(str(tmp / "acc"))
    save_checkpoint(tmp / "acc_dcp", net, acc_opt)
    full = acc_opt.state_dict()
    _train(net, acc_opt, range(K, STEPS), rank)
    out = {"wrapped": type(acc_opt).__name__}
    for how in ("load_state", "load_checkpoint"):
        acc2, model2, net2, acc_opt2 = prepared(5)
        if how == "load_state":
            acc2.load_state(str(tmp / "acc"))
        else:
            load_checkpoint(tmp / "acc_dcp", net2, acc_opt2)
        _train(net2, acc_opt2, range(K, STEPS), rank)
        out[how] = _params_differ(model, model2)
    written = torch.load(tmp / "acc" / "optimizer.bin")
    torch_opt = torch.optim.AdamW(param_groups(TinyLM()))
    torch_opt.load_state_dict(written)  # the file is torch.optim.AdamW's format
    out["file_is_full_state"] = all(
        torch.equal(written["state"][i][k], full["state"][i][k])
        for i in full["state"]
        for k in full["state"][i]
    ) and all(
        written["state"][i]["exp_avg"].shape == p.shape
        for i, p in enumerate(_params(torch_opt))
        if i in written["state"]
    )
    return out


def _two_ranks(rank: int, world: int, tmp: str) -> dict:
    tmp_path = Path(tmp)
    return {
        "resume": _resume_same_world(rank, tmp_path),
        "errors": _errors(rank, tmp_path),
        "accelerate": _accelerate(rank, tmp_path),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return distributed.run(_two_ranks, 2, str(tmp_path_factory.mktemp("two")), timeout=150)


def test_resume_at_the_same_world_size_is_bitwise_the_uninterrupted_run(two_ranks):
    for rank, r in enumerate(two_ranks):
        assert r["resume"]["differ"] == [], f"rank {rank}: {r['resume']['differ']}"


EXPECTED_ERRORS = {
    "missing file": "file __1_0.distcp is missing",
    "truncated file": "file __0_0.distcp has",
    "corrupt file": "file __1_0.distcp does not match its sha256",
    "no manifest": "has no manifest.json",
    "no checkpoint": "no checkpoint at",
    "renamed": "model entry '0.emb.weight' is not in the checkpoint",
    "reshaped": "model entry 'up.weight' is (29, 13) torch.float32 in the checkpoint and (31, 13)",
    "amsgrad": "optimizer state 'max_exp_avg_sq' of parameter 'emb.weight' is not in the",
    "one param group": "has 2 param groups, the optimizer has 1",
    "swapped param groups": "param group 0 differs (parameter #0 is 'emb.weight' in the",
    "save over a non-checkpoint": "exists and is not a checkpoint; not replacing it",
}


@pytest.mark.parametrize("case", EXPECTED_ERRORS)
def test_bad_checkpoints_raise_a_clear_error_and_change_nothing(two_ranks, case):
    for rank, r in enumerate(two_ranks):
        got = r["errors"][case]
        assert got["error"] is not None, f"rank {rank}: {case} loaded without error"
        assert EXPECTED_ERRORS[case] in got["error"], f"rank {rank}: {got['error']}"
        assert got["unchanged"], f"rank {rank}: {case} changed the model or optimizer"


def test_accelerate_save_state_load_state_resume_bitwise(two_ranks):
    for rank, r in enumerate(two_ranks):
        acc = r["accelerate"]
        assert acc["wrapped"] == "AcceleratedOptimizer"
        assert acc["load_state"] == [], f"rank {rank}: {acc['load_state']}"
        assert acc["file_is_full_state"]


def test_sharded_checkpoint_of_accelerate_prepared_objects_resumes_bitwise(two_ranks):
    for rank, r in enumerate(two_ranks):
        assert r["accelerate"]["load_checkpoint"] == [], f"rank {rank}"


# ---- a rank killed in the middle of a save --------------------------------------------------


class _DieMidWrite(FileSystemWriter):
    """Rank 1 writes half of its items, then SIGKILLs itself; other ranks write normally."""

    def write_data(self, plan, planner):
        if dist.get_rank() == 1:
            half = dataclasses.replace(plan, items=plan.items[: len(plan.items) // 2])
            super().write_data(half, planner).wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write_data(plan, planner)


def _killed_save(rank: int, world: int, tmp: str) -> None:
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=15))
    model, opt = _make(0, group)
    _train(model, opt, range(K), rank)
    path = Path(tmp) / "ckpt"
    save_checkpoint(path, model, opt, extra={"step": K})
    full = opt.state_dict()
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": full}, Path(tmp) / "expected.pt")
    _train(model, opt, range(K, STEPS), rank)
    sharded_adamw.checkpointing.checkpoint.FileSystemWriter = _DieMidWrite
    save_checkpoint(path, model, opt, extra={"step": STEPS})


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("killed")
    with pytest.raises(AssertionError) as failure:
        distributed.run(_killed_save, 2, str(tmp), timeout=90)
    return tmp, str(failure.value)


def test_rank_killed_mid_save_leaves_partial_files_only_in_the_temporary_directory(killed):
    tmp, failure = killed
    assert "ranks [1] died without reporting (exit codes [-9])" in failure, failure
    partial = tmp / ".ckpt.tmp"
    assert (partial / "__1_0.distcp").stat().st_size > 0
    assert not (partial / "manifest.json").exists()


def test_previous_checkpoint_survives_a_killed_save_and_loads_intact(killed):
    """Loaded in this (single, process-group-less) process: 2 -> 1 on top of the crash."""
    tmp, _ = killed
    expected = torch.load(tmp / "expected.pt")
    model, opt = _make(9, None, lr=0.5)
    assert load_checkpoint(tmp / "ckpt", model, opt) == {"step": K}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in expected["model"].items())
    got = opt.state_dict()
    assert got["param_groups"] == expected["opt"]["param_groups"]
    for i, entry in expected["opt"]["state"].items():
        assert all(torch.equal(t, got["state"][i][k]) for k, t in entry.items()), i


def test_next_save_after_a_killed_one_replaces_the_checkpoint_and_cleans_up(killed, tmp_path):
    tmp = tmp_path / "copy"
    shutil.copytree(killed[0], tmp)  # leave the killed save's directory to the other tests
    model, opt = _make(9, None)
    _train(model, opt, range(1), 0)
    save_checkpoint(tmp / "ckpt", model, opt, extra={"step": 1})
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []
    manifest = json.loads((tmp / "ckpt" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp"]
    model2, opt2 = _make(10, None)
    assert load_checkpoint(tmp / "ckpt", model2, opt2) == {"step": 1}
    assert _params_differ(model, model2) == []


def test_a_save_that_died_between_its_two_renames_is_found_and_restored(tmp_path):
    """The instant between ``path -> .path.old`` and ``.path.tmp -> path``: loads read the old
    checkpoint, and the next save puts it back before replacing it."""
    model, opt = _make(0, None)
    save_checkpoint(tmp_path / "ckpt", model, opt, extra={"n": 1})
    os.rename(tmp_path / "ckpt", tmp_path / ".ckpt.old")
    assert sharded_adamw.checkpointing.checkpoint.checkpoint_exists(tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt", model, opt) == {"n": 1}
    save_checkpoint(tmp_path / "ckpt", model, opt, extra={"n": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_checkpoint(tmp_path / "ckpt", model, opt) == {"n": 2}


# ---- elastic restart under torchrun ---------------------------------------------------------


def _torchrun(tmp: Path, crash_at: int | None) -> tuple[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # see examples/elastic_train.py
    env.pop("CRASH_AT_STEP", None)
    if crash_at is not None:
        env["CRASH_AT_STEP"] = str(crash_at)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.5",
        str(ROOT / "examples" / "elastic_train.py"),
        "--checkpoint",
        str(tmp / "ckpt"),
        "--out",
        str(tmp / "final.pt"),
        "--steps",
        "8",
        "--save-every",
        "3",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    return log, torch.load(tmp / "final.pt")


@pytest.fixture(scope="module")
def elastic(tmp_path_factory) -> dict:
    return {
        crash: _torchrun(tmp_path_factory.mktemp(f"elastic_{crash}"), crash) for crash in (None, 5)
    }


def test_elastic_run_with_a_killed_rank_restarts_from_the_last_checkpoint(elastic):
    crashed_log, _ = elastic[5]
    clean_log, _ = elastic[None]
    assert "resuming from step 3" in crashed_log, crashed_log
    assert "resuming" not in clean_log, clean_log


def test_elastic_run_with_a_crash_ends_with_the_parameters_of_one_without(elastic):
    (_, crashed), (_, clean) = elastic[5], elastic[None]
    assert crashed.keys() == clean.keys()
    for name in clean:
        assert torch.equal(crashed[name], clean[name]), name
