"""Issue 12: training programs written for three stacks run with ShardedAdamW, changed only
in the optimizer line (and, for Lightning, the strategy), and end where the same program on
``torch.optim.AdamW`` ends; their checkpoints resume.

Each program in ``tests/clients/`` runs under ``torchrun`` on 2 gloo processes and writes its
final parameters and loss. For each stack:

- the sharded run matches the AdamW run: parameters within ``ABS_TOL``, final loss within
  ``REL_TOL`` (clipping sums the norm over shards in another order, so not bitwise);
- clipping is active: the sharded run without clipping is farther than ``ABS_TOL`` from it;
- resuming from the checkpoint the sharded run wrote halfway gives its final parameters;
- every rank ends with the same parameters.

The models have no parameter whose gradient is only rounding noise (an attention key bias):
Adam turns such noise into full-size steps, so the last-bit difference of the clipping norm
(summed over shards in another order) would move it by ~1e-4 (README, "What to expect").

Independent runs of a stack are launched side by side; each launch has a deadline, after
which its whole process group is killed, so a hang fails the test in minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ABS_TOL, REL_TOL = 1e-5, 1e-6
DEADLINE_S = 240.0
DOUBLE_REDUCTION = "every gradient is reduced twice"  # ddp.py's warning when not attached
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


def _environment() -> dict[str, str]:
    """This interpreter's environment without torchrun's variables, the repository
    importable, and the Hugging Face hub offline (the programs download nothing)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def torchrun(launches: dict[str, list[str]], logs: Path) -> None:
    """Run each ``module args...`` of ``launches`` with ``torchrun --standalone
    --nproc_per_node 2`` (a free port each), all at once; fail with the log of each launch
    that exits non-zero or is still running after ``DEADLINE_S``, and for each that warns
    of DDP and ShardedAdamW both reducing the gradient."""
    procs = {}
    for name, (module, *args) in launches.items():
        log = open(logs / f"{name}.log", "w")  # closed below, once the launch ends
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", "2", "-m", module, *args]
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs[name] = (proc, log)
    deadline = time.monotonic() + DEADLINE_S
    failures = []
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        log.close()
        if rc == 0 and DOUBLE_REDUCTION in (logs / f"{name}.log").read_text():
            failures.append(f"{name}: ShardedAdamW was not attached to the DDP model")
        elif rc != 0:
            why = f"still running after {DEADLINE_S:.0f}s, killed" if rc is None else f"exit {rc}"
            tail = (logs / f"{name}.log").read_text()[-6000:]
            failures.append(f"{name}: {why}\n{tail}")
    assert not failures, "\n\n".join(failures)


def result(out: Path) -> dict:
    """Rank 0's parameters and loss, after checking that rank 1 ended with the same."""
    r0, r1 = (torch.load(f"{out}.rank{r}") for r in (0, 1))
    assert r0["params"].keys() == r1["params"].keys()
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), f"ranks disagree on {name}"
    return r0


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two runs' parameters."""
    assert a["params"].keys() == b["params"].keys()
    return max((a["params"][n] - b["params"][n]).abs().max().item() for n in a["params"])


def rel_loss_diff(a: dict, b: dict) -> float:
    return abs(a["loss"] - b["loss"]) / abs(b["loss"])


def assert_matches(got: dict, want: dict, what: str) -> None:
    d, r = max_abs_diff(got, want), rel_loss_diff(got, want)
    print(f"{what}: max |param diff| {d:.3g}, loss rel diff {r:.3g}")
    assert d <= ABS_TOL, f"{what}: parameters differ by {d:.3g} > {ABS_TOL}"
    assert r <= REL_TOL, f"{what}: final loss differs by {r:.3g} relative > {REL_TOL}"


def assert_clipping_matters(unclipped: dict, clipped: dict, what: str) -> None:
    d = max_abs_diff(unclipped, clipped)
    print(f"{what}: unclipped run is {d:.3g} away")
    assert d > 10 * ABS_TOL, f"{what}: the run without clipping is only {d:.3g} away"


# ---- a plain torchrun GPT script -----------------------------------------------------------

GPT = "tests.clients.gpt_script"


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("gpt")
    for d in ("sharded", "adamw", "unclipped", "resumed"):
        (tmp / d).mkdir()
    clip = ["--grad-clip", "0.3"]
    torchrun(
        {
            name: [
                GPT,
                "--optimizer",
                opt,
                "--out",
                str(tmp / name / "out"),
                "--out-dir",
                str(tmp / name),
                *extra,
            ]
            for name, opt, extra in (
                ("sharded", "sharded", clip),
                ("adamw", "adamw", clip),
                ("unclipped", "sharded", ["--grad-clip", "0"]),
            )
        },
        tmp,
    )
    shutil.copy(tmp / "sharded" / "ckpt.pt", tmp / "resumed" / "ckpt.pt")
    torchrun(
        {
            "resumed": [
                GPT,
                "--optimizer",
                "sharded",
                "--out",
                str(tmp / "resumed" / "out"),
                "--out-dir",
                str(tmp / "resumed"),
                "--init-from",
                "resume",
                *clip,
            ]
        },
        tmp,
    )
    return {
        name: result(tmp / name / "out") for name in ("sharded", "adamw", "unclipped", "resumed")
    }


def test_gpt_script_with_compile_accumulation_and_torch_clipping_matches_adamw(gpt_runs):
    assert_matches(gpt_runs["sharded"], gpt_runs["adamw"], "gpt script, sharded vs AdamW")


def test_gpt_script_torch_clip_grad_norm_is_not_a_no_op(gpt_runs):
    assert_clipping_matters(gpt_runs["unclipped"], gpt_runs["sharded"], "gpt script")


def test_gpt_script_resumes_from_its_master_only_checkpoint(gpt_runs):
    assert_matches(gpt_runs["resumed"], gpt_runs["sharded"], "gpt script, resumed vs straight")


# ---- a LightningModule under ShardedDDPStrategy --------------------------------------------

LIGHTNING = "tests.clients.lightning_client"


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("lightning")

    def launch(name: str, optimizer: str, *extra: str) -> list[str]:
        out, ckpt = str(tmp / name / "out"), str(tmp / name)
        return [LIGHTNING, "--optimizer", optimizer, "--out", out, "--ckpt-dir", ckpt, *extra]

    fp16_value = ("--fp16", "--gradient-clip-algorithm", "value", "--gradient-clip-val", "0.01")
    unclipped = ("--gradient-clip-val", "0")  # clipping's sum order would end bitwise
    torchrun(
        {
            "sharded": launch("sharded", "sharded"),
            "adamw": launch("adamw", "adamw"),
            "unclipped": launch("unclipped", "sharded", "--gradient-clip-val", "0"),
            "fp16_sharded": launch("fp16_sharded", "sharded", *fp16_value),
            "fp16_adamw": launch("fp16_adamw", "adamw", *fp16_value),
            "fp16_unclipped": launch("fp16_unclipped", "sharded", "--fp16"),
            "norms_sharded": launch("norms_sharded", "sharded", "--grad-norms", *unclipped),
            "norms_adamw": launch("norms_adamw", "adamw", "--grad-norms", *unclipped),
        },
        tmp,
    )
    halfway = str(tmp / "sharded" / "epoch=0.ckpt")
    torchrun({"resumed": launch("resumed", "sharded", "--resume", halfway)}, tmp)
    names = ("sharded", "adamw", "unclipped", "resumed", "fp16_sharded", "fp16_adamw")
    extra = ("fp16_unclipped", "norms_sharded", "norms_adamw")
    return {name: result(tmp / name / "out") for name in (*names, *extra)}


def test_lightning_strategy_matches_ddp_with_adamw(lightning_runs):
    assert_matches(
        lightning_runs["sharded"], lightning_runs["adamw"], "lightning, sharded vs AdamW"
    )


def test_lightning_gradient_clip_val_clips_the_sharded_gradient(lightning_runs):
    assert_clipping_matters(lightning_runs["unclipped"], lightning_runs["sharded"], "lightning")


def test_lightning_resumes_from_its_own_checkpoint(lightning_runs):
    assert_matches(lightning_runs["resumed"], lightning_runs["sharded"], "lightning, resumed")


def test_lightning_fp16_loss_scaling_and_value_clipping_match_adamw(lightning_runs):
    runs = lightning_runs
    assert_matches(runs["fp16_sharded"], runs["fp16_adamw"], "lightning fp16 + value clip")
    assert_clipping_matters(runs["fp16_unclipped"], runs["fp16_sharded"], "lightning fp16")


def test_lightning_grad_norm_in_on_before_optimizer_step_sees_the_averaged_gradient(
    lightning_runs,
):
    """``grad_norm(self, 2)``, Lightning's documented per-layer norms, read ``p.grad``, None
    under ShardedAdamW; the strategy runs the hook inside ``gathered_grads()``: the same
    norms as under DDP + AdamW, bit for bit, at every step."""
    ours, ref = lightning_runs["norms_sharded"], lightning_runs["norms_adamw"]
    assert ours["norms"] and len(ours["norms"]) == len(ref["norms"])
    for mine, want in zip(ours["norms"], ref["norms"]):
        assert mine.keys() == want.keys() and len(mine) > 1
        for k in want:
            assert torch.equal(mine[k], want[k]), (k, mine[k], want[k])
    assert_matches(ours, ref, "lightning with grad_norm hook, sharded vs AdamW")


# ---- a Hugging Face Trainer ----------------------------------------------------------------

TRAINER = "tests.clients.trainer_client"


@pytest.fixture(scope="module")
def trainer_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="module")
def trainer_runs(trainer_dir) -> dict[str, dict]:
    tmp = trainer_dir

    def launch(name: str, optimizer: str, *extra: str) -> list[str]:
        out, ckpt = str(tmp / name / "out"), str(tmp / name)
        return [TRAINER, "--optimizer", optimizer, "--out", out, "--output-dir", ckpt, *extra]

    torchrun(
        {
            "sharded": launch("sharded", "sharded"),
            "sharded_cls": launch("sharded_cls", "sharded", "--route", "cls"),
            "adamw": launch("adamw", "adamw"),
            "unclipped": launch("unclipped", "sharded", "--max-grad-norm", "0"),
        },
        tmp,
    )
    halfway = str(tmp / "sharded" / "checkpoint-4")
    torchrun({"resumed": launch("resumed", "sharded", "--resume", halfway)}, tmp)
    names = ("sharded", "sharded_cls", "adamw", "unclipped", "resumed")
    return {name: result(tmp / name / "out") for name in names}


def test_trainer_with_optimizers_argument_matches_adamw(trainer_runs):
    assert_matches(trainer_runs["sharded"], trainer_runs["adamw"], "trainer optimizers=")


def test_trainer_with_optimizer_cls_and_kwargs_matches_adamw(trainer_runs):
    assert_matches(trainer_runs["sharded_cls"], trainer_runs["adamw"], "trainer optimizer_cls")


def test_trainer_max_grad_norm_clips_the_sharded_gradient(trainer_runs):
    assert_clipping_matters(trainer_runs["unclipped"], trainer_runs["sharded"], "trainer")


def test_trainer_writes_complete_checkpoints_at_save_steps(trainer_runs, trainer_dir):
    ckpt = trainer_dir / "sharded" / "checkpoint-4"
    for f in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "model.safetensors"):
        assert (ckpt / f).is_file(), f


def test_trainer_resume_from_checkpoint_continues_to_the_same_parameters(trainer_runs):
    assert_matches(trainer_runs["resumed"], trainer_runs["sharded"], "trainer, resumed")
