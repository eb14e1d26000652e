"""The launch scripts start one process per GPU that torch sees, so ``CUDA_VISIBLE_DEVICES``
is honoured (``nvidia-smi --list-gpus`` lists every GPU of the machine whatever it says).

Stubs on ``PATH`` stand in for the machine: ``python`` answers the scripts' count with
``STUB_GPUS`` (or fails, like a python without torch), ``nvidia-smi`` lists 8 GPUs, and
``torchrun`` prints the arguments it was given instead of starting anything.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "launch/run_single_node.sh": {},
    "launch/run_multi_node.sh": {"NNODES": "2", "RDZV_ENDPOINT": "localhost:29400"},
    "launch/run_elastic.sh": {},
}
STUBS = {
    "python": '[ -n "${STUB_PYTHON_FAILS:-}" ] && exit 1\necho "$STUB_GPUS"\n',
    "nvidia-smi": 'for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n',
    "torchrun": 'echo "torchrun-args: $*"\n',
}


@pytest.fixture
def stub_path(tmp_path: Path) -> str:
    for name, body in STUBS.items():
        stub = tmp_path / name
        stub.write_text("#!/usr/bin/env bash\n" + body)
        stub.chmod(0o755)
    return f"{tmp_path}{os.pathsep}{os.environ['PATH']}"


def nproc(script: str, path: str, **env: str) -> int:
    """The ``--nproc_per_node`` that ``script`` hands to (the stub) torchrun."""
    base = {k: v for k, v in os.environ.items() if k != "NPROC"}
    r = subprocess.run(
        ["bash", script],
        cwd=ROOT,
        env={**base, **SCRIPTS[script], **env, "PATH": path},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    args = next(line for line in r.stdout.splitlines() if line.startswith("torchrun-args:"))
    words = args.split()
    return int(words[words.index("--nproc_per_node") + 1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_one_process_per_gpu_torch_sees_not_per_gpu_nvidia_smi_lists(script, stub_path):
    # as with CUDA_VISIBLE_DEVICES=0,1,2 on an 8-GPU machine
    assert nproc(script, stub_path, STUB_GPUS="3") == 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_where_torch_sees_no_gpu_or_cannot_start(script, stub_path):
    assert nproc(script, stub_path, STUB_GPUS="0") == 2
    assert nproc(script, stub_path, STUB_GPUS="3", STUB_PYTHON_FAILS="1") == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_nproc_overrides_the_count(script, stub_path):
    assert nproc(script, stub_path, STUB_GPUS="3", NPROC="5") == 5
