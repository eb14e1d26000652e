"""``python -m benchmarks``: the side-by-side run under torchrun, the table and its ratios, the
byte counting rules, the update-bandwidth mode and the entry points (``python -m``, the CLI).
The copy-byte mode has its own tests (``test_copy_bytes.py``)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import benchmarks as bench
from benchmarks import (
    CONTENDERS,
    Result,
    collective_bytes,
    combine,
    paired_ratio,
    ratio_cell,
    spread,
    storage_bytes,
    table,
)

from . import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def result(name: str, ms: float, state: int, **kw) -> Result:
    return Result(name, times=[ms / 1e3] * 3, state_bytes=state, **kw)


# ---- the whole run under torchrun ---------------------------------------------------------


def test_quick_run_under_torchrun_reports_every_contender_with_ratios_and_writes_the_chart(
    tmp_path,
):
    png = tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "benchmarks", "--quick", "--many-small", "--out", str(png)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "world size 2" in out
    tables = out.split("### ")[1:]
    assert [t.split(":")[0] for t in tables] == ["tiny", "many-small"]
    for t in tables:
        rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in t.splitlines() if ln.startswith("| ")}
        for name in CONTENDERS:
            row = rows[name]
            ran = re.search(r"\(\d+\.\d\dx\)", row)
            skipped = re.search(r"skipped: \S", row)
            assert ran or skipped, row
        assert "(1.00x)" in rows["DDP + AdamW"]
        assert "skipped" not in rows["ShardedAdamW (standalone)"]
    assert png.exists() and png.stat().st_size > 0


def _profile_tables(out: str) -> dict[tuple[str, str], dict[str, list[str]]]:
    """``--profile`` output as {(size, contender): {row name: its other cells}}."""
    tables = {}
    for chunk in out.split("### ")[1:]:
        heading, *body = chunk.splitlines()
        size, name = heading.split(": ", 1)
        lines = [ln for ln in body if ln.startswith("| ")]
        cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
        assert cells[0] == ["row", "what is timed", "ms/step (max over ranks)", "calls/step"]
        tables[(size, name)] = {c[0]: c[1:] for c in cells[1:]}
    return tables


def test_profile_mode_under_torchrun_prints_a_table_per_contender_with_ranges_and_copy_ops():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "benchmarks", "--profile", "--quick", "--many-small"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "benchmarks --profile: world size 2" in proc.stdout
    tables = _profile_tables(proc.stdout)
    names = ["DDP + AdamW", "ShardedAdamW (standalone)", "ShardedAdamW (attach)"]
    assert list(tables) == [(size, n) for size in ("tiny", "many-small") for n in names]
    for (_, name), rows in tables.items():
        ms = {row: float(cells[1]) for row, cells in rows.items()}
        calls = {row: float(cells[2]) for row, cells in rows.items()}
        for row in ("wall (no profiler)", "wall (profiled)", "bench.forward", "bench.backward"):
            assert ms[row] > 0, (name, row)
        assert 0 < ms["bench.step"] <= 1.05 * ms["wall (profiled)"] + 0.1, (name, rows)
        assert calls["bench.step"] == 1 and calls["aten::copy_"] >= 1
        assert rows["aten::copy_"][0] == "op, self CPU"
        ops = [r for r in rows if r.startswith("aten::")]
        # each op row and the sum row is the largest rank's: the largest rank's sum lies
        # between the largest op row and the sum of the op rows (which may come from
        # different ranks)
        tol = 0.01 * len(ops)
        assert max(ms[r] for r in ops) - tol <= ms["copy-like ops, sum"]
        assert ms["copy-like ops, sum"] <= sum(ms[r] for r in ops) + tol
        ours = [r for r in rows if r.startswith("sharded_adamw.")]
        if name == "DDP + AdamW":
            assert not ours
            continue
        for row in ("reduce_scatter_wait", "update", "all_gather_wait"):
            assert "sharded_adamw." + row in ours, (name, ours)
        assert rows["sharded_adamw.update"][0] == "range, total CPU"
        assert calls["sharded_adamw.update"] >= 1
        assert ms["sharded_adamw.update"] <= ms["bench.step"] + 0.01


def test_profile_table_takes_each_row_from_the_largest_rank_per_step():
    from benchmarks.profile import Profile, profile_markdown

    a = Profile("X", steps=2, wall=[0.010, 0.030], wall_profiled=[0.02, 0.02])
    a.ranges = {"sharded_adamw.update": (4000.0, 2, 0.0), "bench.step": (9000.0, 2, 0.0)}
    a.ops = {"aten::copy_": (1000.0, 8, 0.0)}
    b = Profile("X", steps=2, wall=[0.020, 0.020], wall_profiled=[0.01, 0.01])
    b.ranges = {
        "sharded_adamw.update": (6000.0, 2, 0.0),
        "sharded_adamw.new_range": (2.0, 4, 0.0),
    }
    b.ops = {"aten::copy_": (500.0, 10, 0.0), "aten::cat": (800.0, 2, 0.0)}
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in profile_markdown([a, b]).splitlines()}
    assert "| 25.00 | 1 |" in rows["wall (no profiler)"]  # (20 + 30) / 2
    assert "| 20.00 | 1 |" in rows["wall (profiled)"]
    assert "| range, total CPU | 3.00 | 1 |" in rows["sharded_adamw.update"]
    assert "| 4.50 | 1 |" in rows["bench.step"]  # rank b has no such range: a's
    assert "| 0.00 | 2 |" in rows["sharded_adamw.new_range"]  # any name, found generically
    assert "| op, self CPU | 0.50 | 5 |" in rows["aten::copy_"]
    assert "| 0.65 | 6 |" in rows["copy-like ops, sum"]  # rank b's sum: (500 + 800) / 2 us
    order = list(rows)
    assert order.index("bench.step") < order.index("sharded_adamw.new_range")


# ---- the table ---------------------------------------------------------------------------------


def test_ratio_cell_gives_the_ratio_to_the_reference_and_none_without_one():
    assert ratio_cell(12.3, 24.6) == "12.30 (0.50x)"
    assert ratio_cell(250.04, 200.0, ".1f") == "250.0 (1.25x)"
    assert ratio_cell(1.0, None) == "1.00"
    assert ratio_cell(1.0, 0.0) == "1.00"


def test_spread_is_median_and_tenth_and_ninetieth_percentiles_in_ms():
    times = [t / 1e3 for t in range(1, 12)]  # 1..11 ms
    assert spread(times) == pytest.approx((6.0, 2.0, 10.0))
    assert spread([0.005]) == (5.0, 5.0, 5.0)


def test_paired_ratio_is_the_median_of_per_step_ratios_to_the_same_batch():
    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == 2.0
    # a slow second half hits both: the ratio of medians moves, the paired one does not
    ref = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0]
    assert paired_ratio([1.1 * t for t in ref], ref) == pytest.approx(1.1)


def test_table_has_a_row_per_contender_ratios_to_the_first_and_skipped_rows_say_why():
    mib = 2**20
    rows = [
        result("DDP + AdamW", 100.0, 8 * mib, comm_bytes=4 * mib, comm_calls=1),
        result("ShardedAdamW (standalone)", 105.0, 4 * mib, comm_bytes=4 * mib, comm_calls=3),
        Result("DeepSpeed ZeRO-2", skipped="not installed (deepspeed)"),
    ]
    lines = table(rows).splitlines()
    head, _, ddp, ours, ds = lines
    width = head.count("|")
    assert all(line.count("|") == width for line in lines)
    assert "| DDP + AdamW | 100.0 (1.00x) |" in ddp
    assert "| 105.0 (1.05x) | 105.0-105.0 | 1.05x |" in ours
    assert "| 4.00 (0.50x) |" in ours  # state
    assert "4.00 (1.00x) (3)" in ours  # comm bytes, ratio and calls
    assert "skipped: not installed (deepspeed)" in ds
    assert "peak MiB" not in head  # only on GPUs


def test_table_without_a_reference_row_prints_values_without_ratios():
    rows = [Result("DDP + AdamW", skipped="failed: RuntimeError: x"), result("B", 10.0, 2**20)]
    text = table(rows)
    assert "10.0 |" in text and "x)" not in text


def test_combine_takes_the_slowest_rank_per_step_the_largest_bytes_and_the_mean_loss():
    a = Result("X", times=[1.0, 3.0], state_bytes=10, comm_bytes=5, comm_calls=2, loss=1.0)
    b = Result("X", times=[2.0, 2.0], state_bytes=12, comm_bytes=5, comm_calls=2, loss=3.0)
    c = combine([a, b])
    assert (c.times, c.state_bytes, c.comm_bytes, c.comm_calls, c.loss) == (
        [2.0, 3.0],
        12,
        5,
        2,
        2.0,
    )
    assert combine([a, Result("X", skipped="failed: boom")]).skipped == "failed: boom"


def test_chart_is_written_with_one_bar_group_per_size(tmp_path):
    rows = [result("DDP + AdamW", 100.0, 8), result("S", 90.0, 4), Result("D", skipped="x")]
    path = tmp_path / "sub" / "bench.png"
    bench.plot({"small": rows, "medium": rows}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- counting ----------------------------------------------------------------------------------


def test_collective_bytes_follow_the_library_rule():
    x = torch.zeros(10)  # 40 bytes
    pair = [torch.zeros(10), torch.zeros(10)]
    assert collective_bytes("allreduce_", ([x],)) == 80  # twice: reduce-scatter + all-gather
    assert collective_bytes("_reduce_scatter_base_", (torch.zeros(5), x)) == 40  # input
    assert collective_bytes("reduce_scatter_", ([torch.zeros(5)], [pair])) == 80
    assert collective_bytes("_allgather_base_", (x, torch.zeros(5))) == 40  # output
    assert collective_bytes("allgather_", ([pair], [torch.zeros(10)])) == 80
    assert collective_bytes("broadcast_", ([x],)) == 40
    assert collective_bytes("barrier", (torch.zeros(1),)) is None


def test_storage_bytes_count_each_storage_once_and_skip_those_already_counted():
    flat = torch.zeros(100)
    views = [flat[:10], flat[10:], flat.view(10, 10)]
    seen: set[int] = set()
    assert storage_bytes(views + [None], seen) == 400
    assert storage_bytes([flat, torch.zeros(3)], seen) == 12


def test_tensors_in_walks_containers_and_dataclasses():
    inner = Result("x")  # a dataclass without tensors
    t = torch.zeros(2)
    assert bench.tensors_in({"a": [t, (t,)], "b": inner, "c": 3}) == [t, t]


def _missing(model: nn.Module, device: torch.device) -> bench.Trainer:
    import a_peer_that_is_not_installed  # noqa: F401


def _fails_on_rank_1(model: nn.Module, device: torch.device) -> bench.Trainer:
    """Starts on rank 0 (without collectives, which rank 1 would never join) only."""
    if torch.distributed.get_rank() == 1:
        raise RuntimeError("no room\nsecond line")
    opt = torch.optim.AdamW(model.parameters())
    return bench.Trainer(model, lambda loss: loss.backward(), opt.step, lambda: {}, opt)


def _on_two_ranks(rank: int, world: int) -> dict:
    """One counted step of DDP and of standalone ShardedAdamW on the tiny model, and two
    peers that cannot start."""
    torch.manual_seed(0)
    base = bench.SIZES["tiny"].build(8)
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(rank))
    out = {"params": sum(p.numel() for p in base.parameters())}
    for name in ("DDP + AdamW", "ShardedAdamW (standalone)"):
        trainer = CONTENDERS[name](copy.deepcopy(base), torch.device("cpu"))
        for _ in range(2):  # DDP rebuilds its buckets after the first step
            trainer.backward(trainer.net(x).sum())
            trainer.step()
        counter = bench.CommCounter()
        with counter:
            trainer.backward(trainer.net(x).sum())
            trainer.step()
        out[name] = counter.bytes
        if name.startswith("Sharded"):
            stats = trainer.optimizer.comm_stats()
            out["own"] = sum(v for k, v in stats.items() if k.endswith("_bytes"))
            out["own_reduce_scatter"] = stats["reduce_scatter_bytes"]
    for make in (_missing, _fails_on_rank_1):
        runner = bench.Runner(make.__name__, make, base, torch.device("cpu"))
        runner.step(x[:, :-1], x[:, 1:], measure=True)  # a skipped contender does nothing
        out[make.__name__] = (runner.res.skipped, runner.res.times)
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return distributed.run(_on_two_ranks, 2)


def test_comm_counter_sees_ddp_reducer_all_reduce_and_agrees_with_comm_stats(two_ranks):
    for out in two_ranks:
        assert out["DDP + AdamW"] == 2 * 4 * out["params"]
        # on gloo the averaging is an in-place all-reduce (what gloo's reduce-scatter runs
        # anyway): dispatched, it counts twice its buffer; comm_stats counts it once, as the
        # reduce-scatter it stands for
        assert out["ShardedAdamW (standalone)"] == out["own"] + out["own_reduce_scatter"]


def test_a_peer_that_cannot_start_is_skipped_with_its_reason_on_every_rank(two_ranks):
    for out in two_ranks:
        assert out["_missing"] == ("not installed (a_peer_that_is_not_installed)", [])
        assert out["_fails_on_rank_1"] == ("failed: RuntimeError: no room", [])


# ---- update bandwidth and arguments ------------------------------------------------------------


def test_update_bandwidth_runs_on_cpu_and_reports_gb_per_s_and_fraction_of_peak():
    text = bench.update_bandwidth(2**16, torch.device("cpu"), repeats=3, peak_gbps=100.0)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "elements" not in ln]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "65,536" and float(cells[2]) > 0 and float(cells[3]) >= 0
        assert cells[4].endswith("%")


def test_update_bandwidth_mode_from_the_command_line(capsys):
    bench.main(["--gpu-update-bandwidth", "--numel", "4096", "--quick"])
    assert "GB/s at 28 B/element" in capsys.readouterr().out


def test_bench_arguments_quick_sizes_and_only():
    args = bench.parse_args(["--quick"])
    assert args.size_names == ["tiny"] and args.steps == 3
    args = bench.parse_args(
        ["--sizes", "small,medium,large", "--only", "FSDP2 (no reshard after fwd)"]
    )
    assert args.size_names == ["small", "medium", "large"]
    assert args.contenders == ["DDP + AdamW", "FSDP2 (no reshard after fwd)"]
    only = "DDP + ZeroRedundancyOptimizer,ShardedAdamW (attach, overlap_param_gather)"
    assert bench.parse_args(["--only", only]).contenders == [  # a name may hold a comma
        "DDP + AdamW",
        "DDP + ZeroRedundancyOptimizer",
        "ShardedAdamW (attach, overlap_param_gather)",
    ]
    assert bench.parse_args(["--copy-bytes"]).copy_bytes
    for bad in (["--sizes", "huge"], ["--only", "nope"], ["--warmup", "-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_python_m_benchmarks_prints_its_command_line():
    cmd = [sys.executable, "-m", "benchmarks", "--help"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--copy-bytes" in proc.stdout and "--peak-memory" in proc.stdout


def test_many_small_model_gives_every_small_tensor_a_gradient():
    model = bench.MANY_SMALL.build(8)
    x = torch.randint(0, bench.MANY_SMALL.vocab, (2, 8))
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    vecs = list(model.vecs)
    assert len(vecs) == 2000 and all(p.numel() == 64 for p in vecs)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vecs)
