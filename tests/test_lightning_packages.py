"""Issue 23: ``ShardedDDPStrategy`` for both Lightning packages, and one "attached" log line.

A Trainer takes only a strategy derived from its own package's ``Strategy``, and
``lightning.pytorch`` and ``pytorch_lightning`` are two packages with distinct classes, so
``sharded_adamw.integrations.lightning`` builds one strategy class per package from the same
code: ``ShardedDDPStrategy`` (unified ``lightning``) and ``PLShardedDDPStrategy``
(``pytorch_lightning``), each importing its package on first access only.

- Each Trainer takes its own package's strategy and refuses the other's.
- Importing the module imports neither package; with ``lightning`` missing,
  ``PLShardedDDPStrategy`` still works and ``ShardedDDPStrategy`` names the package to install.
- ``tests/clients/lightning_client.py`` (the program of ``test_stacks.py``) trained with a
  ``pytorch_lightning`` Trainer on 2 gloo processes ends where DDP + ``torch.optim.AdamW``
  ends: bitwise without clipping and with fp16 + value clipping, within ``test_stacks``'
  tolerance with norm clipping (the norm is summed over shards in another order); bitwise
  where the unified package's Trainer ends; and its checkpoint resumes bitwise.
- The auto-attach log line ("attached to the DistributedDataParallel model") is emitted once,
  on rank 0 only, like the construction line.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from . import distributed
from .test_stacks import (
    LIGHTNING,
    REPO,
    assert_clipping_matters,
    assert_matches,
    result,
    torchrun,
)

# the public name of each package's strategy
PACKAGES = {"lightning.pytorch": "ShardedDDPStrategy", "pytorch_lightning": "PLShardedDDPStrategy"}


def _trainer(package: str, strategy):
    pl = importlib.import_module(package)
    return pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


# ---- each Trainer, its own strategy class --------------------------------------------------


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_trainer_takes_its_own_package_strategy_and_refuses_the_other(package):
    from sharded_adamw.integrations import lightning

    strategy = getattr(lightning, PACKAGES[package])
    base = importlib.import_module(f"{package}.strategies").DDPStrategy
    assert issubclass(strategy, base)
    assert isinstance(_trainer(package, strategy()).strategy, strategy)
    (other,) = set(PACKAGES) - {package}
    with pytest.raises(ValueError, match="invalid strategy"):
        _trainer(other, strategy())


def test_strategy_classes_are_built_once_and_pickle_by_name():
    from sharded_adamw.integrations import lightning

    classes = {name: getattr(lightning, name) for name in PACKAGES.values()}
    assert classes["ShardedDDPStrategy"] is not classes["PLShardedDDPStrategy"]
    for name, cls in classes.items():
        assert getattr(lightning, name) is cls  # isinstance sees one class
        assert (cls.__name__, cls.__qualname__, cls.__module__) == (name, name, lightning.__name__)
        assert pickle.loads(pickle.dumps(cls)) is cls
        assert name in dir(lightning)
    from sharded_adamw.integrations.lightning import ShardedDDPStrategy  # the name users use

    assert ShardedDDPStrategy is classes["ShardedDDPStrategy"]
    with pytest.raises(AttributeError):
        lightning.NoSuchStrategy  # noqa: B018


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_module_imports_no_lightning_package_and_either_alone_is_enough():
    out = _python(
        """
        import sys
        import sharded_adamw.integrations.lightning as integration

        roots = ("lightning", "pytorch_lightning", "lightning_fabric")
        print(sorted(m for m in sys.modules if m.partition(".")[0] in roots))

        sys.modules["lightning"] = None  # only pytorch_lightning installed
        import pytorch_lightning as pl
        from sharded_adamw.integrations.lightning import PLShardedDDPStrategy

        trainer = pl.Trainer(strategy=PLShardedDDPStrategy(), accelerator="cpu", devices=1)
        print(type(trainer.strategy).__name__)
        try:
            integration.ShardedDDPStrategy
        except ModuleNotFoundError as e:
            print(e)
        """
    )
    loaded, strategy, error = out.strip().splitlines()[-3:]
    assert loaded == "[]"
    assert strategy == "PLShardedDDPStrategy"
    assert "ShardedDDPStrategy" in error and "pip install lightning" in error


# ---- a pytorch_lightning Trainer, trained ----------------------------------------------


@pytest.fixture(scope="module")
def pl_runs(tmp_path_factory) -> dict[str, dict]:
    """The client program on ``pytorch_lightning`` (and once on ``lightning``), in two
    batches of four launches."""
    tmp = tmp_path_factory.mktemp("pytorch_lightning")

    def launch(name: str, optimizer: str, *extra: str, package="pytorch_lightning") -> list:
        out, ckpt = str(tmp / name / "out"), str(tmp / name)
        args = ["--package", package, "--optimizer", optimizer, "--out", out, "--ckpt-dir", ckpt]
        return [LIGHTNING, *args, *extra]

    unclipped = ("--gradient-clip-val", "0")
    fp16_value = ("--fp16", "--gradient-clip-algorithm", "value", "--gradient-clip-val", "0.01")
    torchrun(
        {
            "sharded": launch("sharded", "sharded"),
            "adamw": launch("adamw", "adamw"),
            "unified_sharded": launch("unified_sharded", "sharded", package="lightning"),
            "unclipped_sharded": launch("unclipped_sharded", "sharded", *unclipped),
        },
        tmp,
    )
    halfway = str(tmp / "sharded" / "epoch=0.ckpt")
    torchrun(
        {
            "unclipped_adamw": launch("unclipped_adamw", "adamw", *unclipped),
            "fp16_sharded": launch("fp16_sharded", "sharded", *fp16_value),
            "fp16_adamw": launch("fp16_adamw", "adamw", *fp16_value),
            "resumed": launch("resumed", "sharded", "--resume", halfway),
        },
        tmp,
    )
    return {d.name: result(d / "out") for d in tmp.iterdir() if d.is_dir()}


def assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert got["params"].keys() == want["params"].keys()
    for name, p in got["params"].items():
        assert torch.equal(p, want["params"][name]), f"{what}: {name} differs"
    assert got["loss"] == want["loss"], f"{what}: loss {got['loss']} != {want['loss']}"


# (run, the run it equals bitwise): the same program on DDP + AdamW, on the unified package's
# Trainer, and uninterrupted
BITWISE = {
    "without_clipping_as_ddp_adamw": ("unclipped_sharded", "unclipped_adamw"),
    "fp16_and_value_clipping_as_ddp_adamw": ("fp16_sharded", "fp16_adamw"),
    "as_on_the_lightning_trainer": ("sharded", "unified_sharded"),
    "resumed_from_its_checkpoint_as_uninterrupted": ("resumed", "sharded"),
}


@pytest.mark.parametrize("case", BITWISE)
def test_pytorch_lightning_trainer_trains_bitwise(pl_runs, case):
    got, want = BITWISE[case]
    assert_bitwise(pl_runs[got], pl_runs[want], f"pytorch_lightning {case}")


def test_pytorch_lightning_trainer_with_norm_clipping_matches_ddp_with_adamw(pl_runs):
    assert_matches(pl_runs["sharded"], pl_runs["adamw"], "pytorch_lightning, sharded vs AdamW")
    assert_clipping_matters(pl_runs["unclipped_sharded"], pl_runs["sharded"], "pytorch_lightning")


# ---- the "attached" log line: once, on rank 0 ----------------------------------------------


def _log_records(rank: int, world: int) -> dict[str, list[str]]:
    """The "sharded_adamw" log messages of this rank while DDP and ShardedAdamW are built in
    either order and take a step; and whether each optimizer was attached."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sharded_adamw import ShardedAdamW

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("sharded_adamw")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    torch.manual_seed(0)
    out = {}
    for order in ("ddp_first", "optimizer_first"):
        messages.clear()
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        if order == "ddp_first":
            model = DDP(net)
            opt = ShardedAdamW(model.parameters(), lr=1e-2)
        else:
            opt = ShardedAdamW(net.parameters(), lr=1e-2)
            model = DDP(net)
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        out[order] = [*messages, f"attached: {opt.attached_model is model}"]
    return out


def test_the_attached_log_line_is_emitted_once_on_rank_0():
    per_rank = distributed.run(_log_records, 2)
    for order in ("ddp_first", "optimizer_first"):
        logs = [r[order] for r in per_rank]
        assert all(log[-1] == "attached: True" for log in logs), (order, logs)
        built = [sum("ShardedAdamW: world size" in m for m in log) for log in logs]
        attached = [sum("attached to the DistributedDataParallel" in m for m in g) for g in logs]
        assert built == [1, 0], (order, logs)  # the construction line: the capture works
        assert attached == [1, 0], (order, logs)
