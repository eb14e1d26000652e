"""The ``sharded-adamw`` command line: the estimate's arithmetic, the communication model, the
byte counts against a real step, argument errors, ``report`` and ``verify`` as a real job."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW
from sharded_adamw.tools.cli import SmallModel, main, report
from sharded_adamw.tools.estimate import (
    comm_model,
    counted_comm_bytes,
    estimate_memory,
    even_split,
    numel,
    padded_numel,
)

from . import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m sharded_adamw.tools.cli *args`` in the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "sharded_adamw.tools.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- memory arithmetic ------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_fp32_ddp_holds_16_bytes_per_parameter_and_standalone_4_plus_12_over_d(d):
    sizes = {1024: 8}  # divides by every d: no padding
    P = 8192
    m = estimate_memory(sizes, d, "fp32")
    assert (m["ddp"].params, m["ddp"].grads, m["ddp"].state) == (4 * P, 4 * P, 8 * P)
    assert m["ddp"].per_param == 16
    assert m["standalone"].per_param == 4 + 12 / d
    assert (m["standalone"].grads, m["standalone"].state) == (4 * P // d, 8 * P // d)
    # attached: DDP's full gradients plus the optimizer's own gradient shard
    assert m["attached"].per_param == 8 + 12 / d
    assert m["attached"].grads == 4 * P + 4 * P // d


@pytest.mark.parametrize("d", [2, 8])
def test_bf16_ddp_is_the_18_byte_row_and_sharded_keeps_2_byte_params(d):
    P = 8192
    m = estimate_memory({1024: 8}, d, "bf16")
    assert (m["ddp"].params, m["ddp"].grads, m["ddp"].state) == (2 * P, 4 * P, 12 * P)
    assert m["standalone"].per_param == 2 + 16 / d  # fp32 grad shard, master, exp_avg(_sq)
    assert m["attached"].per_param == 4 + 16 / d  # plus DDP's bf16 gradients


def test_padding_is_exact_for_sizes_that_do_not_divide():
    # one bucket; on CUDA every tensor starts at a multiple of 64 fp32 (256 bytes): at 0,
    # 1024, 2048, 3072 and 3136, so the span is 3143; shards of ceil(3143 / 4) = 786
    # rounded up to 64: 832. On the CPU (64 bytes, 16 fp32): bases 0, 1008, 2016, 3024,
    # 3040, span 3047, shards of 762 rounded up to 16: 768.
    sizes = {1001: 3, 7: 2}
    for device, shard in (("cuda", 832), ("cpu", 768)):
        m = estimate_memory(sizes, 4, "fp32", device=device)["standalone"]
        assert m.params == 4 * numel(sizes)  # parameters keep their own, unpadded storage
        assert m.grads == 4 * shard
        assert m.state == 8 * shard
        assert padded_numel(sizes, 4, device=device) - numel(sizes) == 4 * shard - 3017
    assert estimate_memory(sizes, 4, "fp32")["ddp"].total == 16 * numel(sizes)  # no padding


def test_even_split_gives_the_remainder_to_the_first_tensors():
    assert even_split(10, 3) == {4: 1, 3: 2}
    assert even_split(7_000_000_000, 1) == {7_000_000_000: 1}
    assert even_split(12, 4) == {3: 4}
    assert numel(even_split(7_000_000_001, 291)) == 7_000_000_001
    with pytest.raises(ValueError, match="cannot fill"):
        even_split(3, 4)


def test_hybrid_sharding_divides_state_by_the_shard_size_only():
    sizes = {1001: 3}
    hybrid = estimate_memory(sizes, 16, "fp32", replicas=2)["standalone"]
    flat8 = estimate_memory(sizes, 8, "fp32")["standalone"]
    assert (hybrid.params, hybrid.grads, hybrid.state) == (flat8.params, flat8.grads, flat8.state)


# ---- communication model ----------------------------------------------------------------------


def test_ddp_ring_all_reduce_and_flat_sharding_send_the_same_bytes_in_fp32():
    P, W = 8 * 1024, 8
    c = comm_model({1024: 8}, W, "fp32")
    assert c["ddp"].bytes_on("intra") == 2 * (W - 1) / W * P * 4
    assert c["flat"].bytes_on("intra") == c["ddp"].bytes_on("intra")
    assert [x.kind for x in c["flat"].collectives] == ["reduce-scatter", "all-gather"]
    assert c["ddp"].bytes_on("inter") == 0 and "hybrid" not in c


def test_bf16_reduces_in_fp32_and_gathers_in_bf16():
    P, W = 8 * 1024, 4
    rs, ag = comm_model({1024: 8}, W, "bf16")["flat"].collectives
    assert rs.buffer_bytes == 4 * P and ag.buffer_bytes == 2 * P
    rs, _ = comm_model({1024: 8}, W, "bf16", reduce_dtype="bf16")["flat"].collectives
    assert rs.buffer_bytes == 2 * P


def test_a_group_spanning_nodes_is_charged_to_the_inter_node_link():
    sizes = {1024: 8}
    assert comm_model(sizes, 8, gpus_per_node=8)["ddp"].collectives[0].link == "intra"
    assert comm_model(sizes, 16, gpus_per_node=8)["ddp"].collectives[0].link == "inter"
    # 2 nodes of 8: shard groups of 8 are nodes, replicate groups {s, s+8} cross them
    h = comm_model(sizes, 16, replicas=2, gpus_per_node=8)["hybrid"]
    assert [c.link for c in h.collectives] == ["intra", "intra", "inter"]
    # shard groups of 2 on nodes of 3 ranks: group {2, 3} straddles a node boundary
    h = comm_model(sizes, 6, replicas=3, gpus_per_node=3)["hybrid"]
    assert [c.link for c in h.collectives] == ["inter", "inter", "inter"]
    # everything on one node
    h = comm_model(sizes, 8, replicas=2, gpus_per_node=8)["hybrid"]
    assert [c.link for c in h.collectives] == ["intra", "intra", "intra"]


def test_hybrid_all_reduces_only_the_shard_across_replicas():
    sizes, W, R = {1001: 3}, 16, 2
    S = W // R
    h = comm_model(sizes, W, "fp32", replicas=R, gpus_per_node=8)["hybrid"]
    rs, ag, ar = h.collectives
    padded = padded_numel(sizes, S)
    assert rs.buffer_bytes == ag.buffer_bytes == 4 * padded
    assert ar.kind == "all-reduce" and ar.group_size == R
    assert ar.buffer_bytes == 4 * padded // S
    assert h.bytes_on("inter") == 2 * (R - 1) / R * 4 * padded / S
    assert h.bytes_on("intra") == 2 * (S - 1) / S * 4 * padded


def test_time_lower_bound_is_the_busiest_link_and_serial_time_adds_links():
    h = comm_model({1024: 8}, 16, replicas=2, gpus_per_node=8)["hybrid"]
    intra, inter = h.bytes_on("intra") / 200e9, h.bytes_on("inter") / 25e9
    low, serial = h.seconds(200.0, 25.0)
    assert low == pytest.approx(max(intra, inter))
    assert serial == pytest.approx(intra + inter)


def test_counted_bytes_follow_the_collectives_convention():
    sizes = {1001: 3, 7: 2}
    padded = padded_numel(sizes, 4)
    flat = counted_comm_bytes(sizes, 4, "fp32", standalone=False)
    assert flat == {
        "reduce_scatter_bytes": 4 * padded,
        "all_gather_bytes": 4 * padded,
        "all_reduce_bytes": 2 * 4,  # the non-finite flag
    }
    standalone = counted_comm_bytes(sizes, 4, "fp32")
    assert standalone["all_reduce_bytes"] == 2 * 4 * (1 + 5)  # plus one flag per tensor
    hybrid = counted_comm_bytes(sizes, 8, "fp32", replicas=2, standalone=False)
    assert hybrid["all_reduce_bytes"] == 2 * 4 * padded // 4 + 2 * 2 * 4  # flag in both groups


# ---- the estimate against a real optimizer -----------------------------------------------------


def _real_step(rank: int, world: int) -> dict:
    """One step of SmallModel per setup; what the optimizer held and counted."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for dtype, attach, replicas in [
        ("fp32", True, 1),
        ("fp32", False, 1),
        ("bf16", False, 1),
        ("fp32", True, 2),
        ("fp32", False, 2),
    ]:
        torch.manual_seed(0)
        model = SmallModel().to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))
        sizes = [p.numel() for p in model.parameters()]
        net = DDP(model) if attach else model
        opt = ShardedAdamW(model.parameters(), process_group=mesh if replicas > 1 else None)
        if attach:
            opt.attach(net)
        x = torch.randint(0, 37, (4, 5), generator=torch.Generator().manual_seed(rank))
        net(x).float().square().mean().backward()
        opt.step()
        out[(dtype, attach, replicas)] = {
            "sizes": sizes,
            "memory": opt.memory(),
            "stats": opt.comm_stats(),
            "param_storage": sum(p.untyped_storage().nbytes() for p in model.parameters()),
            "local_grads": sum(
                p.grad.numel() * p.grad.element_size()
                for p in model.parameters()
                if p.grad is not None
            ),
            "ddp_buckets": sum(  # DDP's own gradient buffers, as DDP reports them
                b.buffer().numel() * b.buffer().element_size()
                for b in net.reducer._get_zeros_like_grad_buckets()
            )
            if attach
            else 0,
        }
    return out


@pytest.fixture(scope="module")
def real_steps():
    return distributed.run(_real_step, 4)


@pytest.mark.parametrize(
    "dtype, attach, replicas",
    [
        ("fp32", True, 1),
        ("fp32", False, 1),
        ("bf16", False, 1),
        ("fp32", True, 2),
        ("fp32", False, 2),
    ],
    ids=[
        "fp32-attached",
        "fp32-standalone",
        "bf16-standalone",
        "hybrid-attached",
        "hybrid-standalone",
    ],
)
def test_estimate_equals_what_a_real_step_holds_and_counts(real_steps, dtype, attach, replicas):
    for rank, per_setup in enumerate(real_steps):
        r = per_setup[(dtype, attach, replicas)]
        est = estimate_memory(r["sizes"], 4, dtype, replicas=replicas, device="cpu")
        est = est["attached" if attach else "standalone"]
        step_counters = 4 * len(r["sizes"])  # host memory, left out of the estimate
        assert est.state + step_counters == r["memory"]["state_allocated_bytes"], rank
        held = r["ddp_buckets"] + r["local_grads"] + r["memory"]["grad_shard_bytes"]
        assert est.grads == held, rank
        assert est.params == r["param_storage"], rank
        counted = counted_comm_bytes(
            r["sizes"], 4, dtype, replicas=replicas, standalone=not attach, backend="gloo"
        )
        stats = r["stats"]
        assert {k: stats[k] for k in counted} == counted, (rank, stats)


# ---- the command line -------------------------------------------------------------------------


def test_estimate_prints_memory_and_communication_tables(capsys):
    assert main(["estimate", "--params", "7e9", "--world-size", "8", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "| DDP + torch AdamW | 13.04 GiB | 26.08 GiB | 78.23 GiB | 117.35 GiB | 18.000 |" in out
    assert "| ShardedAdamW standalone (ZeRO-2, 8-way) |" in out and "| 4.000 | 0.222x |" in out
    assert "| ShardedAdamW attached to DDP (ZeRO-1, 8-way) |" in out
    assert "Assumed a decoder-only transformer" in out and "291 tensors" in out
    assert "| DDP all-reduce over 8 ranks |" in out and "| ShardedAdamW flat, 8-way |" in out


def test_estimate_with_int8_state_and_remainders_lists_the_state_buffers(capsys):
    """7B in bf16 at 8 ranks, every tensor a whole number of blocks: int8 moments are
    2 * (1 + 4/256) B and remainder masters 2.125 B per parameter over 8 ranks, beside
    2 B of parameters and 4/8 of fp32 gradient shard: 3.020 B/param standalone."""
    args = ["estimate", "--params", "7e9", "--world-size", "8", "--dtype", "bf16"]
    assert main([*args, "--state-dtype", "int8", "--master-remainders"]) == 0
    out = capsys.readouterr().out
    assert "| ShardedAdamW standalone (ZeRO-2, 8-way) |" in out and "| 3.020 | 0.168x |" in out
    assert "| DDP + torch AdamW | 13.04 GiB | 26.08 GiB | 78.23 GiB | 117.35 GiB | 18.000 |" in out
    assert "## ShardedAdamW optimizer state per rank" in out
    for buffer, per_param in [
        ("moments, int8 codes", 0.25),
        ("moments, int8 scales", 2 * 4 / 256 / 8),
        ("master weights, remainders", 2.125 / 8),
    ]:
        row = next(line for line in out.splitlines() if line.startswith(f"| {buffer} |"))
        assert float(row.split("|")[4]) == pytest.approx(per_param, abs=5e-4), row
    assert "Extra padding" in out and "which makes 0 elements of padding per rank more" in out
    # without the options, the report is the one it always was
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--state-dtype", "fp32"]) == 0
    assert capsys.readouterr().out == plain and "optimizer state per rank" not in plain


def test_estimate_with_replicas_adds_the_hybrid_row(capsys):
    main(
        [
            "estimate",
            "--params",
            "350M",
            "--world-size",
            "16",
            "--replicas",
            "2",
            "--num-tensors",
            "101",
        ]
    )
    out = capsys.readouterr().out
    assert "ShardedAdamW hybrid, 2 replicas x 8-way" in out
    assert "state sharded 8-way x 2 replicas" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--params", "-5", "--world-size", "8"], "argument --params: expected a positive whole"),
        (["--params", "1.5", "--world-size", "8"], "argument --params: expected a positive whole"),
        (["--params", "lots", "--world-size", "8"], "argument --params: expected a number"),
        (["--params", "7e9", "--world-size", "0"], "argument --world-size: must be >= 1, got 0"),
        (
            ["--params", "7e9", "--world-size", "8", "--dtype", "fp8"],
            "argument --dtype: invalid choice: 'fp8'",
        ),
        (
            ["--params", "7e9", "--world-size", "8", "--replicas", "3"],
            "argument --replicas: 3 does not divide --world-size 8",
        ),
        (
            ["--params", "10", "--world-size", "8", "--num-tensors", "11"],
            "argument --num-tensors: 11 tensors cannot hold --params 10",
        ),
        (
            ["--params", "7e9", "--world-size", "8", "--inter-bw", "0"],
            "argument --inter-bw: must be a positive number of GB/s, got '0'",
        ),
        (
            ["--params", "7e9", "--world-size", "8", "--state-dtype", "fp8"],
            "argument --state-dtype: invalid choice: 'fp8'",
        ),
    ],
    ids=[
        "negative",
        "fraction",
        "not-a-number",
        "world-size-0",
        "dtype",
        "replicas",
        "num-tensors",
        "bandwidth",
        "state-dtype",
    ],
)
def test_bad_estimate_arguments_give_an_argparse_error_naming_them(args, message):
    r = cli("estimate", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "usage: sharded-adamw estimate" in r.stderr, r.stderr


def test_bad_arguments_of_the_training_subcommands_are_named():
    r = cli("verify", "--steps", "0")
    assert r.returncode == 2 and "argument --steps: must be >= 1, got 0" in r.stderr, r.stderr
    r = cli("verify", "--world-size-check")
    assert r.returncode == 2 and "argument --world-size-check: world size is 1" in r.stderr
    r = cli("report", "--replicas", "3")
    assert r.returncode == 2, r.stderr
    assert "argument --replicas: 3 does not divide the world size 1" in r.stderr


def test_every_subcommand_explains_itself_in_help(capsys):
    for sub, words in [
        ("estimate", "--state-dtype {fp32,bf16,int8}"),
        ("estimate", "--master-remainders"),
        ("estimate", "ZeRO-2"),
        ("verify", "bitwise"),
        ("report", "opt.memory()"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main([sub, "--help"])
        assert exit_.value.code == 0
        assert f"usage: sharded-adamw {sub}" in (out := capsys.readouterr().out) and words in out


def test_report_of_a_local_optimizer_shows_memory_and_counted_bytes():
    torch.manual_seed(0)
    model = SmallModel()
    opt = ShardedAdamW(model.parameters())
    model(torch.randint(0, 37, (4, 5))).square().mean().backward()
    opt.step()
    text = report(opt)
    P = sum(p.numel() for p in model.parameters())
    assert f"{P:,} trainable parameters" in text
    shard = opt.memory()["grad_shard_bytes"]  # the parameters and their alignment padding
    assert 4 * P <= shard < 4 * (P + 16 * len(list(model.parameters())))
    assert f"| gradient shard | {shard:,} |" in text
    assert f"| reduce-scatter | 1 | {shard:,} |" in text  # one group, one bucket, world 1
    assert "## Communication in the last step" in text


def test_report_subcommand_runs_as_one_process():
    r = cli("report", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert "standalone (ZeRO-2), world size 1" in r.stdout
    assert "| optimizer state, allocated (with padding) |" in r.stdout


def torchrun_verify(nproc: int, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """``sharded-adamw verify`` under torchrun with ``nproc`` gloo processes."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "sharded_adamw.tools.cli",
            "verify",
            "--steps",
            str(steps),
            "--world-size-check",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_verify_under_torchrun_reports_bitwise_equality_at_world_size_2():
    r = torchrun_verify(2, 5)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: world size 2, 5 steps" in r.stdout
    assert "all parameters bitwise equal" in r.stdout
    n_params = len(list(SmallModel().parameters()))
    assert r.stdout.count("| yes |") == n_params, r.stdout


def test_verify_attached_on_gloo_is_bitwise_at_world_size_3():
    """Attached on gloo, DDP's own buffer is averaged in place: DDP's bits at any W."""
    r = torchrun_verify(3, 5)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all parameters bitwise equal" in r.stdout, r.stdout


def test_verify_at_world_size_3_passes_within_the_stated_tolerance_and_says_why():
    """At 3 ranks DDP's all-reduce and the standalone reduce-scatter (a chunked buffer) add in
    different orders: the run is correct, parameters are bitwise equal or within 1e-5
    relative, and the summary says so."""
    r = torchrun_verify(3, 5, "--standalone")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "(" in line]
    assert len(rows) == len(list(SmallModel().parameters())), r.stdout
    verdicts = [row.rstrip(" |").rsplit("| ", 1)[1] for row in rows]
    assert set(verdicts) <= {"yes", "no, within 1e-05"}, r.stdout
    assert "no, within 1e-05" in verdicts, "nothing differs: this run proves no tolerance"
    for row in rows:
        assert float(row.split("|")[5]) <= 1e-5, row
    assert "verify: world size 3, 5 steps" in r.stdout
    assert "within 1e-05 relative" in r.stdout
    assert "add the ranks' gradients in different orders" in r.stdout


def test_small_model_exercises_padding_up_to_12_ranks():
    sizes = [p.numel() for p in SmallModel().parameters()]
    assert all(n % k for n in sizes for k in range(2, 13))
