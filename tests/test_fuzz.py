"""Differential fuzzing in CI: a fixed set of seeds per world size (``tests/fuzz.py``).

Each seed draws a random training program; it runs with ShardedAdamW and with the oracle
(DDP + ``torch.optim.AdamW``, plain AdamW at W = 1, an fp32-master reference for bf16; its
state rounded as ShardedAdamW stores bf16 or int8 state) on the same ranks, and must match:
bitwise at W <= 2 and for bf16 / int8 state, to ``fuzz.REL_TOL`` at W = 3. A failing seed
is shrunk (within ``SHRINK_BUDGET`` runs) and the assertion message gives the seed, the
difference and the minimal program. All seeds of one world size run in one spawn of W
processes (module-scoped fixture). Longer runs: ``python -m tests.fuzz --seeds N``.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest

from . import fuzz

# seeds per world size: about 3 minutes on 2 CPU cores together, shrinking included. Those
# with bf16 / int8 state or remainder masters: W=1 int8 1, 5, 6, 10, 12, 13, 14, 19, 26, 27,
# 31, bf16 7, 18, 30, 37, remainders 28, 33, 34, 38; W=2 int8 18, 27, 35, 37, 43 (hand-overs
# to torch AdamW and back), bf16 7, 8, 24, 25, 30, remainders 8, 27, 35; W=3 int8 8, 133
# (fused), bf16 87: attached, the only programs with such state at W = 3, where no bf16
# parameters (hence no remainders) are drawn
CI_SEEDS = {1: range(0, 40), 2: [*range(0, 32), 35, 37, 43], 3: [*range(0, 10), 87, 133]}
SHRINK_BUDGET = 12
# int8 state's kernels run eager: both sides call the same ones (the oracle's round trip
# too), so the comparison does not depend on it, and compiling them costs every rank
# process 5-20 s; ``python -m tests.fuzz`` runs them compiled, the library's default
ENV = {"SHARDED_ADAMW_COMPILE": "0"}

_results: dict[int, dict[int, dict]] = {}


@pytest.fixture(scope="module")
def fuzz_results():
    def get(world: int) -> dict[int, dict]:
        if world not in _results:
            with mock.patch.dict(os.environ, ENV):  # the spawned ranks inherit it
                items = fuzz.run_seeds(world, list(CI_SEEDS[world]), SHRINK_BUDGET)
            _results[world] = {item["seed"]: item for item in items}
        return _results[world]

    return get


@pytest.mark.parametrize(
    "world, seed",
    [(w, s) for w, seeds in CI_SEEDS.items() for s in seeds],
    ids=lambda v: str(v),
)
def test_program_matches_oracle(fuzz_results, world, seed):
    item = fuzz_results(world)[seed]
    if item["failure"] is not None:
        text = fuzz.report(item)
        rerun = f"\nrerun: python -m tests.fuzz --start {seed} --seeds 1 --world-size {world}"
        pytest.fail(text + "\nfull program:\n" + item["program"] + rerun, pytrace=False)


def test_generator_draws_every_dimension():
    """The CI seeds (and any 300 seeds) draw every feature; the shrinker's candidates of a
    valid program are programs the generator could have drawn constraints-wise."""
    seen: set[str] = set()
    for w in (1, 2, 3):
        for seed in range(300):
            p = fuzz.generate(seed, w)
            assert fuzz.valid(p), p.show()
            p.show()
            seen |= _features(p)
    want = {
        "W1",
        "W2",
        "W3",
        "attach",
        "standalone",
        "ddp_first",
        "bucket_view",
        "tied",
        "bf16",
        "groups3",
        "amsgrad",
        "maximize",
        "absent",
        "zero",
        "per_rank",
        "freeze",
        "unfreeze",
        "add_group",
        "set_to_none_false",
        "accumulate",
        "no_sync",
        "sched:step",
        "sched:cosine",
        "sched:onecycle",
        "reload",
        "to_torch",
        "to_sharded",
        "foreach:True",
        "foreach:False",
        "fused",
        "no_overlap_comm",
        "overlap_param_gather",
        "torch.compile",
        "model.compile",
        "bucket_lt_param",
        "frozen0",
        "full_grads",
        "state:bf16",
        "state:int8",
        "master_remainders",
    }
    assert want <= seen, sorted(want - seen)
    # the CI seeds themselves run each state option at every world size that has it (bf16
    # parameters, hence remainders, are drawn at W <= 2 only)
    for w, seeds in CI_SEEDS.items():
        ci = set().union(*(_features(fuzz.generate(s, w)) for s in seeds))
        want_w = {"state:bf16", "state:int8"} | ({"master_remainders"} if w <= 2 else set())
        assert want_w <= ci, (w, sorted(want_w - ci))
    p = fuzz.generate(3, 2)
    for cand in fuzz._candidates(p):
        cand.show()


def _features(p: fuzz.Program) -> set[str]:
    f = {f"W{p.world}", p.mode, f"sched:{p.sched}", f"foreach:{p.foreach}", p.compile}
    f |= {k for k in ("ddp_first", "bucket_view", "tied", "bf16", "fused") if getattr(p, k)}
    f |= {"no_overlap_comm"} if not p.overlap_comm else set()
    f |= {"overlap_param_gather"} if p.overlap_param_gather else set()
    f |= {"frozen0"} if p.frozen0 else set()
    f |= {"full_grads"} if p.full_grads else set()
    f |= {f"state:{p.state_dtype}"}
    f |= {"master_remainders"} if p.master_remainders else set()
    f |= {f"groups{len(p.groups)}"}
    f |= {k for g in p.groups for k in ("amsgrad", "maximize") if getattr(g, k)}
    biggest = max(
        [p.dim * p.vocab] + [p.dim * (p.dim if b.kind == "lin" else b.hidden) for b in p.blocks]
    )
    if biggest * 4 > p.bucket_cap_mb * 2**20:
        f.add("bucket_lt_param")
    for s in p.steps:
        f |= {e.kind for e in s.events}
        if not s.set_to_none:
            f.add("set_to_none_false")
        if len(s.micro) > 1:
            f.add("accumulate")
            if s.no_sync:
                f.add("no_sync")
        for per in s.micro:
            values = {v for d in per for v in d.values()}
            f |= {"absent"} if "a" in values else set()
            f |= {"zero"} if "z" in values else set()
            if any(d != per[0] for d in per):
                f.add("per_rank")
    return f
