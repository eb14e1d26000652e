"""``sharded-adamw estimate`` sized from the model: ``--model package.module:factory`` (the
factories below), ``--hf-config config.json``, and the transformer ``--params`` now assumes.

The estimate from a model must equal the estimate from the same tensors listed by hand, and
the buckets it plans must be the ones a real ``ShardedAdamW`` builds over that model (per
param group, last tensor first, frozen tensors left out). Factories run on the meta device.

With ``state_dtype`` and ``master_remainders`` (``--state-dtype``, ``--master-remainders``),
the buckets, every state buffer by name and the update's temporaries must be those of a real
``ShardedAdamW`` with those options (world size 1, in this process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from sharded_adamw import ShardedAdamW
from sharded_adamw.core.state_formats import BlockwiseInt8, Remainders
from sharded_adamw.tools.cli import main
from sharded_adamw.tools.estimate import (
    TensorSpec,
    bucket_layouts,
    comm_model,
    counted_comm_bytes,
    estimate_memory,
    estimate_peak,
    estimate_state,
    even_split,
    model_tensors,
    render_estimate,
    transformer_split,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = "tests.test_estimate_model"
BUILT_ON: list[torch.device] = []  # the device of every small_gpt's first parameter

# ---- the factories ----------------------------------------------------------------------------

VOCAB, DIM, HIDDEN, CONTEXT, LAYERS = 101, 24, 61, 17, 2


class Block(nn.Module):
    """Attention projections (fused qkv), an MLP and two layernorms, with biases."""

    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)


class SmallGPT(nn.Module):
    """A GPT-2-like decoder: token and (frozen) position embeddings, blocks, a final norm and
    a head tied to the token embedding (so it is one parameter)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(CONTEXT, DIM)
        self.pos.weight.requires_grad_(False)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.tok.weight


def small_gpt() -> SmallGPT:
    """The factory ``--model tests.test_estimate_model:small_gpt`` calls; records where its
    parameters were created."""
    model = SmallGPT()
    BUILT_ON.append(next(model.parameters()).device)
    return model


def small_gpt_groups() -> list[dict]:
    """Param groups as training scripts make them: weight decay on matrices only."""
    model = SmallGPT()
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def small_gpt_params():
    """An iterable of parameters, as ``model.parameters()`` gives."""
    return SmallGPT().parameters()


def raising_factory() -> nn.Module:
    raise RuntimeError("no GPUs here")


def frozen_factory() -> nn.Module:
    return nn.Linear(3, 4).requires_grad_(False)


def returns_a_number() -> int:
    return 3


def integer_parameter() -> list[torch.Tensor]:
    return [nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)]


NOT_CALLABLE = 7


def by_hand(groups: bool = False) -> list[TensorSpec]:
    """SmallGPT's tensors written out: registration order, the tied head once, the position
    embedding frozen; with ``groups``, matrices in group 0 and vectors in group 1."""
    block = [DIM, DIM, 3 * DIM * DIM, 3 * DIM, DIM * DIM, DIM, DIM, DIM, HIDDEN * DIM, HIDDEN]
    block += [DIM * HIDDEN, DIM]
    matrices = {VOCAB * DIM, CONTEXT * DIM, 3 * DIM * DIM, DIM * DIM, HIDDEN * DIM}
    sizes = [VOCAB * DIM, CONTEXT * DIM] + block * LAYERS + [DIM, DIM]
    specs = [
        TensorSpec(n, "fp32", int(groups and n not in matrices), trainable=i != 1)
        for i, n in enumerate(sizes)
    ]
    if groups:  # each group in registration order, matrices first
        specs = [t for g in (0, 1) for t in specs if t.group == g]
    return specs


def estimates(tensors, world_size: int, dtype: str = "fp32", **kw) -> tuple:
    """Every number the estimate computes for ``tensors``."""
    return (
        estimate_memory(tensors, world_size, dtype, **kw),
        estimate_peak(tensors, world_size, dtype, **kw),
        comm_model(tensors, world_size, dtype, **kw),
        counted_comm_bytes(tensors, world_size, dtype, **kw),
    )


def run(capsys, *args: str) -> str:
    """``sharded-adamw estimate *args`` in this process; its output."""
    assert main(["estimate", *args]) == 0
    return capsys.readouterr().out


def tables(text: str) -> str:
    """The report from its memory table on (the lines above it name the source)."""
    return text[text.index("## Memory per rank") :].rstrip("\n")


def strip_names(specs: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(t.numel, t.dtype, t.group, t.trainable) for t in specs]


# ---- --model ----------------------------------------------------------------------------------


def test_model_tensors_are_the_registration_order_with_the_tied_head_once_and_frozen_kept():
    with torch.device("meta"):
        model = SmallGPT()
    specs = model_tensors(model)
    assert strip_names(specs) == by_hand()
    assert specs[0].name == "tok.weight" and not specs[1].trainable
    assert all(t.name for t in specs)
    assert strip_names(model_tensors(model, "bf16")) == [
        TensorSpec(t.numel, "bf16", t.group, t.trainable) for t in by_hand()
    ]


@pytest.mark.parametrize("world_size, replicas", [(4, 1), (7, 1), (8, 2)])
def test_model_estimate_equals_the_estimate_of_its_tensors_listed_by_hand(
    capsys, world_size, replicas
):
    BUILT_ON.clear()
    args = ["--world-size", str(world_size), "--replicas", str(replicas), "--dtype", "bf16"]
    out = run(capsys, "--model", f"{HERE}:small_gpt", *args)
    assert BUILT_ON == [torch.device("meta")]  # built on meta: nothing allocated
    hand = [TensorSpec(t.numel, "bf16", t.group, t.trainable) for t in by_hand()]
    expected = render_estimate(None, world_size, "bf16", tensors=hand, replicas=replicas)
    assert tables(out) == tables(expected)
    with torch.device("meta"):
        specs = model_tensors(SmallGPT(), "bf16")
    assert estimates(specs, world_size, "bf16", replicas=replicas) == estimates(
        hand, world_size, "bf16", replicas=replicas
    )
    trainable = sum(t.numel for t in hand if t.trainable)
    frozen = CONTEXT * DIM
    assert f"# {trainable:,} trainable parameters, bf16" in out
    assert f"{HERE}:small_gpt() (SmallGPT, cast to bf16 by --dtype)" in out
    assert "1 frozen" in out and f"({frozen:,} parameters: every rank holds them" in out
    assert f"the largest tok.weight ({VOCAB * DIM:,} elements)" in out


def test_frozen_tensors_are_held_but_get_no_gradient_or_state():
    hand = by_hand()
    frozen = CONTEXT * DIM
    trainable = [t for t in hand if t.trainable]
    with_frozen, without = estimate_memory(hand, 4), estimate_memory(trainable, 4)
    for setup in ("ddp", "attached", "standalone"):
        assert with_frozen[setup].params == without[setup].params + 4 * frozen
        assert with_frozen[setup].grads == without[setup].grads
        assert with_frozen[setup].state == without[setup].state
    assert estimate_peak(hand, 4) == estimate_peak(trainable, 4)  # above the bare model


def test_a_factory_may_return_param_groups_or_an_iterable_of_parameters(capsys):
    out = run(capsys, "--model", f"{HERE}:small_gpt_groups", "--world-size", "4")
    assert "in 2 param groups" in out and "(list, dtypes as built" in out
    expected = render_estimate(None, 4, tensors=by_hand(groups=True))
    assert tables(out) == tables(expected)
    # groups are bucketed apart: the estimate differs from one group's
    assert estimates(by_hand(groups=True), 4) != estimates(by_hand(), 4)
    out = run(capsys, "--model", f"{HERE}:small_gpt_params", "--world-size", "4")
    assert "in 1 param group," in out
    assert tables(out) == tables(render_estimate(None, 4, tensors=by_hand()))


@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "two-groups"])
def test_buckets_are_those_a_real_optimizer_builds(groups):
    """Same buckets, same tensors in each at the same offsets, same shards and so the same
    bytes as a real ShardedAdamW over the same parameters (world size 1, one process; a cap
    small enough for several buckets, which depend on the order the buckets fill in)."""
    torch.manual_seed(0)
    opt = ShardedAdamW(small_gpt_groups() if groups else small_gpt_params(), bucket_cap_mb=0.01)
    specs = model_tensors(opt.param_groups)
    assert strip_names(specs) == by_hand(groups)
    layouts = bucket_layouts(specs, 1, bucket_cap_mb=0.01, device="cpu")
    real = [b.layout for b in opt.buckets]
    assert len(real) > 3 + groups
    assert [(lay.key[0], [(s.numel, s.base) for s in lay.slots]) for lay in layouts] == [
        (lay.key[0], [(s.numel, s.base) for s in lay.slots]) for lay in real
    ]
    assert [lay.shard_numel for lay in layouts] == [lay.shard_numel for lay in real]
    # the first bucket starts with the last trainable tensor of the first group
    assert layouts[0].slots[0].numel == [t for t in specs if t.group == 0][-1].numel
    held = opt.memory()
    peak = estimate_peak(specs, 1, bucket_cap_mb=0.01, backend="gloo")["standalone"].parts
    assert peak["gradient shard"] == held["grad_shard_bytes"]
    steps = 4 * sum(t.trainable for t in specs)  # step counters, host memory, not estimated
    assert peak["optimizer state"] + steps == held["state_allocated_bytes"]


def test_model_runs_from_the_working_directory_in_a_fresh_process():
    r = subprocess.run(
        [sys.executable, "-m", "sharded_adamw.tools.cli", "estimate", "--model"]
        + [f"{HERE}:small_gpt", "--world-size", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "SmallGPT, dtypes as built" in r.stdout and "| ShardedAdamW standalone" in r.stdout


# ---- --params: the assumed transformer --------------------------------------------------------


def test_7b_is_assumed_to_be_llama_7b_shaped():
    shape = transformer_split(7_000_000_000)
    assert (shape.layers, shape.d_model, shape.vocab, shape.num_tensors) == (32, 4096, 32000, 291)
    assert abs(shape.numel - 7_000_000_000) <= 1.5 * shape.d_model * shape.layers
    tensors = shape.tensors()
    assert len(tensors) == 291 and sum(t.numel for t in tensors) == shape.numel
    assert tensors[0].name == "embed_tokens" and tensors[-1].name == "lm_head"
    for params in (125e6, 350e6, 1.3e9, 13e9, 70e9):
        shape = transformer_split(int(params))
        assert abs(shape.numel - params) <= 1.5 * shape.d_model * shape.layers, params
        assert shape.d_model == 128 * shape.layers
    with pytest.raises(ValueError, match="fewer than the smallest transformer"):
        transformer_split(1_000_000)


def _standalone_peak_per_param(out: str) -> float:
    """B/param of the peak table's standalone row (the memory table's comes first)."""
    rows = [line for line in out.splitlines() if line.startswith("| ShardedAdamW standalone (")]
    assert "ZeRO-2" in rows[0] and "ZeRO-2" not in rows[1], rows
    return float(rows[1].split("|")[3])


def test_params_alone_assumes_a_transformer_and_says_so(capsys):
    out = run(capsys, "--params", "7B", "--world-size", "8", "--dtype", "bf16")
    assert (
        "Assumed a decoder-only transformer (LLaMA-style, the rule of estimate.transformer_split)"
        ": 32 layers, d_model 4,096, MLP width 11,673, vocab 32,000, untied head: 291 tensors"
        in out
    )
    assert "pass --model or --hf-config for your own model" in out
    realistic = _standalone_peak_per_param(out)
    even = estimate_peak(even_split(7_000_000_000, 291), 8, "bf16")["standalone"].per_param
    assert realistic < 3 and abs(realistic - even) / even < 0.15, (realistic, even)
    # --num-tensors keeps the old meaning: the whole model as one tensor, one bucket in flight
    one = run(
        capsys, "--params", "7B", "--world-size", "8", "--dtype", "bf16", "--num-tensors", "1"
    )
    assert "split evenly over --num-tensors 1" in one
    assert _standalone_peak_per_param(one) == pytest.approx(10.5, abs=0.01)
    assert realistic < 10.5 / 4


def test_params_too_few_for_a_transformer_fall_back_to_one_tensor(capsys):
    out = run(capsys, "--params", "1M", "--world-size", "8")
    assert "- Tensors: one of 1,000,000 elements: 1,000,000 parameters are fewer" in out


# ---- --hf-config ------------------------------------------------------------------------------

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 1000,
}
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 999}
GPT2 |= {"n_positions": 1024, "bos_token_id": 0, "eos_token_id": 0}
DISTILBERT = {  # an encoder: no causal LM class, so AutoModel
    "model_type": "distilbert",
    "dim": 32,
    "n_layers": 1,
    "n_heads": 2,
    "hidden_dim": 37,
    "vocab_size": 50,
    "max_position_embeddings": 16,
}


def _write(folder, config: dict) -> str:
    folder.mkdir(exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_hf_config_builds_the_causal_lm_on_meta(capsys, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = _write(tmp_path / "llama", LLAMA)
    out = run(capsys, "--hf-config", path, "--world-size", "4", "--dtype", "bf16")
    assert f"{path} (LlamaForCausalLM, cast to bf16 by --dtype)" in out
    assert "21 trainable in 1 param group" in out  # embedding, 2 x 9, norm, untied head
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert next(model.parameters()).is_meta
    expected = render_estimate(None, 4, "bf16", tensors=model_tensors(model, "bf16"))
    assert tables(out) == tables(expected)
    # the folder works too, and without --dtype each tensor keeps the config's dtype
    folder = _write(tmp_path / "bf16", LLAMA | {"torch_dtype": "bfloat16"})
    out = run(capsys, "--hf-config", os.path.dirname(folder), "--world-size", "4")
    assert "(LlamaForCausalLM, dtypes as built" in out and "parameters, bf16," in out
    assert tables(out) == tables(expected)


def test_hf_config_ties_weights_and_falls_back_to_automodel(capsys, tmp_path):
    out = run(capsys, "--hf-config", _write(tmp_path / "gpt2", GPT2), "--world-size", "2")
    assert "(GPT2LMHeadModel," in out
    n = 999 * 32 + 1024 * 32 + 2 * (4 * 32 + 3 * 32 * 32 + 3 * 32 + 32 * 32 + 32)
    n += 2 * (32 * 128 + 128 + 128 * 32 + 32) + 2 * 32  # MLPs, final norm; head tied
    assert f"# {n:,} parameters, fp32" in out
    out = run(capsys, "--hf-config", _write(tmp_path / "enc", DISTILBERT), "--world-size", "2")
    assert "(DistilBertModel," in out


# ---- errors -----------------------------------------------------------------------------------


def _error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["estimate", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: sharded-adamw estimate" in err, err
    return err


@pytest.mark.parametrize(
    "spec, message",
    [
        ("small_gpt", "argument --model: expected package.module:factory"),
        ("tests/test_estimate_model.py:small_gpt", "expected package.module:factory"),
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        (f"{HERE}:missing", f"module '{HERE}' has no attribute 'missing'"),
        (f"{HERE}:NOT_CALLABLE", "is a int, not a function"),
        (f"{HERE}:raising_factory", "raising_factory() raised RuntimeError: no GPUs here"),
        (f"{HERE}:returns_a_number", "returned an object of type int: expected an nn.Module"),
        (f"{HERE}:frozen_factory", "returned a Linear without trainable parameters"),
        (f"{HERE}:integer_parameter", "needs floating-point parameters: tensor 0 is torch.int64"),
    ],
    ids=[
        "no-colon",
        "a-path",
        "no-module",
        "no-attribute",
        "not-callable",
        "factory-raises",
        "not-a-model",
        "all-frozen",
        "integer",
    ],
)
def test_a_bad_model_is_named(capsys, spec, message):
    err = _error(capsys, "--model", spec, "--world-size", "8")
    assert "argument --model: " in err and message in err, err


def test_a_missing_hf_config_is_named(capsys, tmp_path):
    missing = str(tmp_path / "nope" / "config.json")
    err = _error(capsys, "--hf-config", missing, "--world-size", "8")
    assert f"argument --hf-config: no such file or folder: {missing!r}" in err
    err = _error(capsys, "--hf-config", str(tmp_path), "--world-size", "8")
    assert f"argument --hf-config: folder {str(tmp_path)!r} has no config.json" in err
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    err = _error(capsys, "--hf-config", str(bad), "--world-size", "8")
    assert "argument --hf-config: cannot read" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--params", "7B", "--model", f"{HERE}:small_gpt"],
            "argument --model: not allowed with argument --params",
        ),
        (
            ["--model", f"{HERE}:small_gpt", "--hf-config", "config.json"],
            "argument --hf-config: not allowed with argument --model",
        ),
        ([], "one of the arguments --params --model --hf-config is required"),
        (
            ["--model", f"{HERE}:small_gpt", "--num-tensors", "3"],
            "argument --num-tensors: only with --params (--model gives the model's own tensors)",
        ),
    ],
    ids=["params-and-model", "model-and-hf-config", "none", "num-tensors-with-model"],
)
def test_the_sources_exclude_each_other(capsys, args, message):
    err = _error(capsys, *args, "--world-size", "8")
    assert message in err, err


# ---- state_dtype and master_remainders ------------------------------------------------------

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
STATE_OPTIONS = [("fp32", True), ("bf16", False), ("bf16", True), ("int8", False), ("int8", True)]
STATE_IDS = ["fp32-remainders", "bf16", "bf16-remainders", "int8", "int8-remainders"]


class MixedModel(nn.Module):
    """fp32 and bf16 tensors on both sides of int8 state's 4,096-element threshold, none a
    multiple of its 256-element blocks (so int8 buckets add padding)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(301, 20)  # 6,020: quantized
        self.a = nn.Linear(20, 100)  # 2,000 and 100: fp32 state
        self.b = nn.Linear(100, 77).to(torch.bfloat16)  # 7,700: quantized, bf16 masters
        self.c = nn.Linear(77, 50)  # 3,850: just under the threshold
        self.d = nn.Linear(50, 5000).to(torch.bfloat16)  # 250,000 and 5,000: quantized


def mixed_groups(model: nn.Module) -> list[dict]:
    return [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]


def real_state_parts(opt: ShardedAdamW) -> dict[str, int]:
    """The optimizer's state buffers summed under the estimate's names."""
    out: dict[str, int] = {}

    def add(name: str, t: torch.Tensor) -> None:
        out[name] = out.get(name, 0) + t.numel() * t.element_size()

    for b in opt.buckets:
        for key, store in b.stores().items():
            kind = "master weights" if key == "master_param" else "moments"
            if isinstance(store, BlockwiseInt8):
                add("moments, int8 codes", store.codes)
                add("moments, int8 scales", store.scales)
            elif isinstance(store, Remainders):
                add("master weights, remainders", store.low)
                add("master weights, remainders", store.up)
            else:
                add(f"{kind}, {str(store.data.dtype).removeprefix('torch.')}", store.data)
    renamed = {"float32": "fp32", "bfloat16": "bf16", "float64": "fp64"}
    return {
        k.split(", ")[0] + ", " + renamed.get(k.split(", ")[1], k.split(", ")[1]): v
        for k, v in out.items()
    }


@pytest.mark.parametrize("state_dtype, remainders", STATE_OPTIONS, ids=STATE_IDS)
def test_state_buffers_are_those_a_real_optimizer_allocates(state_dtype, remainders):
    """Buckets (int8 ones apart, aligned to whole blocks), every state buffer by name, the
    padding and ``opt.memory()``, against a real ShardedAdamW with the same options."""
    torch.manual_seed(0)
    groups = mixed_groups(MixedModel())
    opt = ShardedAdamW(
        groups,
        bucket_cap_mb=0.01,
        state_dtype=STATE_DTYPES[state_dtype],
        master_remainders=remainders,
    )
    specs = model_tensors(groups)
    options = dict(state_dtype=state_dtype, master_remainders=remainders)
    layouts = bucket_layouts(specs, 1, bucket_cap_mb=0.01, device="cpu", state_dtype=state_dtype)
    real = [b.layout for b in opt.buckets]
    assert [
        (lay.key[0], lay.key[2], [(s.numel, s.base) for s in lay.slots], lay.shard_numel)
        for lay in layouts
    ] == [
        (lay.key[0], lay.key[3], [(s.numel, s.base) for s in lay.slots], lay.shard_numel)
        for lay in real
    ]
    est = estimate_state(specs, 1, bucket_cap_mb=0.01, device="cpu", **options)
    assert est.parts == real_state_parts(opt)
    held = opt.memory()
    steps = 4 * len(specs)  # step counters, host memory, not estimated
    assert est.total + steps == held["state_allocated_bytes"]
    assert est.shard_numel == sum(b.layout.shard_numel for b in opt.buckets)
    fp32 = ShardedAdamW(mixed_groups(MixedModel()), bucket_cap_mb=0.01)
    assert est.fp32_shard_numel == sum(b.layout.shard_numel for b in fp32.buckets)
    assert (est.extra_padding > 0) == (state_dtype == "int8")  # no size is whole blocks
    peak = estimate_peak(specs, 1, bucket_cap_mb=0.01, backend="gloo", **options)
    assert peak["standalone"].parts["gradient shard"] == held["grad_shard_bytes"]
    memory = estimate_memory(specs, 1, device="cpu", **options)["standalone"]
    assert memory.state == estimate_state(specs, 1, device="cpu", **options).total
    assert est.compact  # every option changes something here (remainders: the bf16 tensors)


def test_int8_state_costs_a_byte_and_a_scale_per_block_and_pads_to_whole_blocks():
    """One fp32 tensor of 4,097 elements at 4 ranks on CUDA: fp32 state's shard is
    ceil(4097 / 4) = 1,025 rounded up to 64 elements (256 B), int8's to 256 elements."""
    est = estimate_state([4097], 4, state_dtype="int8")
    assert (est.fp32_shard_numel, est.shard_numel, est.extra_padding) == (1088, 1280, 192)
    assert est.parts == {"moments, int8 codes": 2 * 1280, "moments, int8 scales": 2 * 5 * 4}
    small = estimate_state([4095], 4, state_dtype="int8")  # under the threshold: fp32 state
    assert small.parts == {"moments, fp32": 2 * 4 * 1024} and not small.compact
    bf16 = estimate_state([4097], 4, "bf16", state_dtype="bf16", master_remainders=True)
    S = 1152  # bf16 on CUDA aligns to 128 elements (256 B): 1,025 rounded up
    assert bf16.parts == {"moments, bf16": 2 * 2 * S, "master weights, remainders": 2 * S + S // 8}
    with pytest.raises(ValueError, match="unknown state_dtype 'fp8'"):
        estimate_state([4097], 4, state_dtype="fp8")


def _profiled_peak(fn) -> int:
    """The most bytes ``fn`` had allocated at once beyond what it started with, from torch
    profiler's allocation records (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


COMPILES = pytest.mark.distributed  # torch.compile of the int8 kernels runs the C compiler


@pytest.mark.parametrize("cap_mb", [25.0, 0.5], ids=["one-run", "several-runs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "state_dtype, remainders",
    [
        pytest.param(*options, id=name, marks=[COMPILES] if options != ("bf16", False) else [])
        for options, name in zip(STATE_OPTIONS[1:], STATE_IDS[1:])
    ],
)
def test_update_temporaries_are_what_the_step_allocates(state_dtype, remainders, dtype, cap_mb):
    """The estimate's update stretches (compact state read out as fp32 for a run, foreach
    AdamW's temporary) against what ``step()`` allocates, as
    torch's profiler records it, after a warm-up step (which compiles the int8 kernels;
    eager ones, where compiling fails, allocate more, which the estimate leaves out)."""
    if state_dtype == "int8" and os.environ.get("SHARDED_ADAMW_COMPILE") == "0":
        pytest.skip("the int8 kernels run eager (SHARDED_ADAMW_COMPILE=0)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 300), nn.Linear(300, 50)).to(dtype)
    groups = mixed_groups(model)
    opt = ShardedAdamW(
        groups,
        foreach=True,
        bucket_cap_mb=cap_mb,
        state_dtype=STATE_DTYPES[state_dtype],
        master_remainders=remainders,
    )
    loss = lambda: model(torch.randn(4, 512, dtype=dtype)).float().square().mean()  # noqa: E731
    loss().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    if any("torch.compile of the state kernels failed" in str(w.message) for w in caught):
        pytest.skip("the int8 kernels run eager here (torch.compile failed)")
    loss().backward()
    measured = _profiled_peak(opt.step)
    est = estimate_peak(
        model_tensors(groups),
        1,
        bucket_cap_mb=cap_mb,
        backend="gloo",
        state_dtype=state_dtype,
        master_remainders=remainders,
    )["standalone"]
    stretches = {k: sum(v.values()) for k, v in est.phases.items() if k != "backward"}
    assert set(stretches) == {"update"}
    # a few bytes more: the step counters' increments
    assert 0 <= measured - max(stretches.values()) <= 64, (measured, est.phases)


def test_state_options_are_listed_by_buffer_and_the_default_report_is_unchanged(capsys):
    tensors = [TensorSpec(n, "bf16", name=f"t{i}") for i, n in enumerate([5000, 300, 70_000])]
    plain = render_estimate(None, 4, tensors=tensors)
    assert render_estimate(None, 4, tensors=tensors, state_dtype="fp32") == plain
    assert "## ShardedAdamW optimizer state per rank" not in plain
    out = render_estimate(None, 4, tensors=tensors, state_dtype="int8", master_remainders=True)
    for name in (
        "## ShardedAdamW optimizer state per rank",
        "| moments, int8 codes |",
        "| moments, int8 scales |",
        "| moments, fp32 |",  # the 300-element tensor
        "| master weights, remainders |",
        "Extra padding: int8 state starts every quantized tensor and shard at a whole block",
        "moments read out as fp32",
        "masters read out as fp32",
        "foreach temporary",
        "gradients in flight (largest bucket)",
        "ShardedAdamW state (--state-dtype int8)",
    ):
        assert name in out, name
    est = estimate_state(tensors, 4, state_dtype="int8", master_remainders=True)
    assert f"{est.extra_padding:,} elements of padding per rank more" in out
    bf16 = render_estimate(None, 4, tensors=tensors, state_dtype="bf16")
    assert "| moments, bf16 |" in bf16 and "| master weights, fp32 |" in bf16
    assert "Extra padding" not in bf16 and "remainder write" not in bf16
    # options that change nothing say so, and leave the tables as they were
    fp32 = [TensorSpec(n, "fp32") for n in (5000, 300)]
    noop = render_estimate(None, 4, tensors=fp32, master_remainders=True)
    assert "- --master-remainders changes nothing for these tensors" in noop
    assert tables(noop) == tables(render_estimate(None, 4, tensors=fp32))
    # the command line passes the options through
    out = run(
        capsys,
        "--model",
        f"{HERE}:small_gpt",
        "--world-size",
        "4",
        "--dtype",
        "bf16",
        "--state-dtype",
        "int8",
        "--master-remainders",
    )
    hand = [TensorSpec(t.numel, "bf16", t.group, t.trainable) for t in by_hand()]
    expected = render_estimate(
        None, 4, "bf16", tensors=hand, state_dtype="int8", master_remainders=True
    )
    assert tables(out) == tables(expected) and "| master weights, remainders |" in out


def test_compact_state_peaks_are_the_held_buffers_plus_the_largest_stretch():
    sizes = {2048 * 2048: 12, 2048: 12}
    est = estimate_peak(sizes, 4, backend="gloo", state_dtype="int8")
    for row in ("attached", "standalone"):
        m = est[row]
        assert set(m.phases) == {"backward", "update"}
        stretch = max(sum(v.values()) for v in m.phases.values())
        assert m.total == sum(m.parts.values()) + stretch
        assert m.peak_phase == "backward"  # a 16 MiB gradient outweighs a 4 MiB shard's reads
    default = estimate_peak(sizes, 4, backend="gloo")
    assert all(not m.phases for m in default.values())
    assert estimate_peak(sizes, 4, backend="gloo", state_dtype="fp32") == default
    assert est["ddp"] == default["ddp"]  # DDP + torch AdamW keeps fp32 state
