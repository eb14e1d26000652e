"""The example runs end to end: the launch script (README's first command, with a tiny model)
on two gloo ranks, and the same script as one plain process. Both ShardedAdamW modes must end
bitwise equal to DDP + AdamW and save what their ZeRO stage says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--steps", "8", "--layers", "1", "--d-model", "32", "--seq-len", "32", "--batch-size", "4"]
MODES = {"attached": "ZeRO-1", "standalone": "ZeRO-2"}  # ShardedAdamW's modes in the demo
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root with this interpreter's environment (its
    ``torchrun`` first on PATH, the repository importable) and no torchrun variables."""
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [base.get("PYTHONPATH"), str(REPO)]))
    proc = subprocess.run(
        cmd, cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _savings(out: str, rank: int) -> dict[str, list[float]]:
    """Each ShardedAdamW mode's saving row of ``rank``: params, grads, state, total."""
    savings = {}
    for mode, stage in MODES.items():
        row = re.search(rf"^rank {rank}  saving {mode} \({stage}\)\s+(.*)$", out, re.M)
        assert row, out
        savings[mode] = [float(cell.rstrip("x")) for cell in row[1].split()]
    return savings


def _assert_bitwise(out: str, ranks: range) -> None:
    for rank in ranks:
        for mode in MODES:
            line = (
                rf"^rank {rank}: max \|ShardedAdamW {mode} - AdamW\| .* = 0, bitwise equal: True$"
            )
            assert re.search(line, out, re.M), out


def test_single_node_launch_trains_both_modes_and_torch_adamw_to_the_same_bits(tmp_path):
    png = tmp_path / "loss.png"
    proc = _run(
        ["bash", "launch/run_single_node.sh", *TINY, "--out", str(png)], NPROC="2", LOG_RANK="0"
    )
    out = proc.stdout
    assert "+ torchrun --standalone --nproc_per_node 2 --local-ranks-filter 0 " in out
    assert "memory per rank (MiB)" in out
    for rank in (0, 1):
        for row in ("ShardedAdamW attached", "ShardedAdamW standalone", "DDP + AdamW"):
            assert f"rank {rank}  {row} " in out
        savings = _savings(out, rank)
        # columns params, grads, state, total: at world size 2 the optimizer state halves in
        # both modes; standalone also shards the gradients, so it saves more in total
        for params, _, state, _ in savings.values():
            assert params == 1.0
            assert 1.9 < state <= 2.0
        assert savings["standalone"][3] > savings["attached"][3] > 1.0
    _assert_bitwise(out, range(2))
    assert "examples/memory_table.py" in out
    _assert_png(png)


def test_train_gpt_runs_as_one_plain_process(tmp_path):
    png = tmp_path / "loss.png"
    proc = _run([sys.executable, "examples/train_gpt.py", *TINY, "--out", str(png)])
    assert "world size 1" in proc.stderr
    _assert_bitwise(proc.stdout, range(1))
    assert "rank 1" not in proc.stdout
    _assert_png(png)


def test_multi_node_launch_with_hybrid_sharding_runs_on_one_node(tmp_path):
    """launch/run_multi_node.sh with c10d rendezvous on localhost, 4 ranks as a 2 x 2 mesh."""
    from .distributed import free_port

    proc = _run(
        [
            "bash",
            "launch/run_multi_node.sh",
            *TINY,
            "--shard-size",
            "2",
            "--out",
            str(tmp_path / "l.png"),
        ],
        NNODES="1",
        NPROC="4",
        RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
        LOG_RANK="0",
    )
    assert "--rdzv-backend c10d" in proc.stdout
    assert "world size 4" in proc.stderr
    # hybrid sums each gradient as (a + b) + (c + d): close to DDP, not bitwise
    for mode in MODES:
        line = rf"^rank 0: max \|ShardedAdamW {mode} - AdamW\| over parameters = (\S+),"
        assert float(re.search(line, proc.stdout, re.M)[1]) < 1e-5


def test_state_precision_quick_writes_the_plot_and_a_row_per_state_dtype(tmp_path):
    """examples/state_precision.py --quick: both models trained with fp32, bf16 and int8 state
    (the script itself fails unless the large parameters kept int8 codes)."""
    png = tmp_path / "state_precision.png"
    cmd = [sys.executable, "examples/state_precision.py", "--quick", "--out", str(png)]
    proc = _run(cmd, OMP_NUM_THREADS="1")  # tiny models: one thread is fastest on a busy CPU
    for model in ("char-level GPT", "MLP on teacher labels"):
        assert f"{model}: int8 codes for " in proc.stderr
        rows = re.findall(rf"^{model}\s+(fp32|bf16|int8)\s+(\d+\.\d+)\s", proc.stdout, re.M)
        assert [dtype for dtype, _ in rows] == ["fp32", "bf16", "int8"], proc.stdout
        # a few steps from the same weights on the same batches: the three are still close
        losses = [float(loss) for _, loss in rows]
        assert max(losses) - min(losses) < 1e-2, proc.stdout
    _assert_png(png)
