"""``sharded-adamw``: estimate memory and communication, verify against DDP + AdamW, report.

- ``estimate``: arithmetic only (``estimate.py``), no processes. The tensors come from the
  user's model (``--model package.module:factory`` or ``--hf-config config.json``, built on the
  meta device, so nothing is allocated) or, from a count alone (``--params``), from the
  decoder-only transformer ``estimate.transformer_split`` assumes.
- ``verify``: trains a small model with DDP + ShardedAdamW and with DDP + torch.optim.AdamW
  from the same weights on the same data, and compares them parameter by parameter.
- ``report``: trains a small model a few steps and prints ``report(opt)``.

The side-by-side benchmark against DDP and the ZeRO-style peers is not part of the installed
package: it runs from a checkout, ``python -m benchmarks --help``.

``verify`` and ``report`` run under torchrun (``torchrun --nproc_per_node K -m
sharded_adamw.tools.cli verify``) or as one process; they join torchrun's process group, or make
a one-process group, with NCCL when CUDA is available and gloo otherwise. Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import os
import sys
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..core.optimizer import ShardedAdamW
from .estimate import (
    DTYPE_BYTES,
    STATE_DTYPES,
    TensorSpec,
    format_bytes,
    markdown_table,
    model_tensors,
    render_estimate,
)

SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
VOCAB = 37
# verify: bitwise up to this many ranks; beyond, REL_TOL relative (see ``verify``)
BITWISE_WORLD_SIZE = 2
REL_TOL = 1e-5


# ---- argument types: each error names the value; argparse adds the argument's name ---------


def parameter_count(text: str) -> int:
    """A positive whole number of parameters: ``7e9``, ``7000000000``, ``7B``, ``350M``."""
    body, scale = text.strip(), 1
    if body[-1:].upper() in SUFFIXES:
        body, scale = body[:-1], SUFFIXES[body[-1].upper()]
    try:
        value = Decimal(body) * scale
    except InvalidOperation:
        raise argparse.ArgumentTypeError(
            f"expected a number of parameters such as 7e9 or 7B, got {text!r}"
        ) from None
    if not value.is_finite() or value != value.to_integral_value() or value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive whole number of parameters, got {text!r}"
        )
    return int(value)


def _at_least(low: int) -> Callable[[str], int]:
    """An argument type: a whole number no smaller than ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def bandwidth(text: str) -> float:
    """A positive bandwidth in GB/s."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GB/s such as 25, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of GB/s, got {text!r}")
    return value


positive = _at_least(1)


def factory_spec(text: str) -> str:
    """``package.module:factory``: a module to import and a callable in it (``factory`` may
    be dotted, ``module:Class.build``)."""
    module, sep, attr = text.strip().partition(":")
    dotted = lambda name: all(part.isidentifier() for part in name.split("."))  # noqa: E731
    if not sep or not dotted(module) or not dotted(attr):
        raise argparse.ArgumentTypeError(
            "expected package.module:factory (a module to import, a colon, and a function in "
            f"it that returns the model or its param groups), got {text!r}"
        )
    return text.strip()


# ---- the model behind --model and --hf-config ------------------------------------------------


class ModelError(Exception):
    """``--model`` or ``--hf-config`` gives no tensors; the message names the problem."""


def build_on_meta(factory: Callable[[], object], what: str) -> object:
    """``factory()`` under ``torch.device("meta")``: the tensors it creates without an explicit
    device have shapes and dtypes but no storage, so sizing a 70B model costs no memory."""
    try:
        with torch.device("meta"):
            return factory()
    except Exception as e:
        raise ModelError(
            f"{what} raised {type(e).__name__}: {e} (it runs on the meta device, where tensors "
            "have no data: a factory that loads weights or computes with its parameters "
            "cannot; build the model from its config instead)"
        ) from e


def load_factory(spec: str) -> Callable[[], object]:
    """Import ``package.module`` of ``package.module:factory`` (the working directory first
    on the path, as ``python -m`` has it) and return its ``factory``."""
    module_name, _, attr = factory_spec(spec).partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"cannot import module {module_name!r}: {e}") from e
    except Exception as e:
        raise ModelError(f"importing {module_name!r} raised {type(e).__name__}: {e}") from e
    finally:
        if added:
            sys.path.remove(cwd)
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"{spec} is a {type(obj).__name__}, not a function")
    return obj


def hf_model(path: str) -> nn.Module:
    """The model of a local Hugging Face ``config.json`` (or a folder holding one), built on
    the meta device: ``AutoModelForCausalLM`` for a causal LM, else ``AutoModel``. Imports
    transformers only here."""
    if not os.path.exists(path):
        raise ModelError(f"no such file or folder: {path!r}")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"folder {path!r} has no config.json")
    try:
        import transformers
    except ImportError as e:
        raise ModelError(f"needs transformers (pip install transformers): {e}") from e
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelError(
            f"cannot read {path!r} as a Hugging Face config: {type(e).__name__}: {e}"
        ) from e
    causal = type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return build_on_meta(lambda: auto.from_config(config), f"{auto.__name__}.from_config")


def load_tensors(
    model: str | None = None, hf_config: str | None = None, dtype: str | None = None
) -> tuple[list[TensorSpec], str]:
    """The tensors of ``--model`` (a factory spec) or ``--hf-config`` (a path), and a few
    words on where they came from. ``dtype`` casts them all (``None``: the model's own).
    Raises ``ModelError`` naming the problem."""
    if (model is None) == (hf_config is None):
        raise ValueError("give exactly one of model and hf_config")
    if model is not None:
        built, what = build_on_meta(load_factory(model), f"{model}()"), f"{model}()"
    else:
        built, what = hf_model(hf_config), hf_config
    kind = type(built).__name__
    try:
        tensors = model_tensors(built, dtype)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{what} returned an object of type {kind}: {e}") from e
    if not any(t.trainable and t.numel for t in tensors):
        raise ModelError(f"{what} returned a {kind} without trainable parameters")
    how = f"cast to {dtype} by --dtype" if dtype else "dtypes as built; --dtype casts them"
    return tensors, f"{what} ({kind}, {how})"


# ---- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``sharded-adamw`` parser with its three subcommands."""
    parser = argparse.ArgumentParser(
        prog="sharded-adamw",
        description="ZeRO-style sharded AdamW for PyTorch: size a job, check that the "
        "optimizer matches torch.optim.AdamW, and show what it holds and sends.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    est = sub.add_parser(
        "estimate",
        help="per-rank memory and communication of DDP + AdamW vs ShardedAdamW (no GPUs needed)",
        description="Print per-rank memory (params, grads, optimizer state incl. fp32 master "
        "weights) of DDP + torch AdamW, ShardedAdamW attached to DDP (ZeRO-1) and "
        "ShardedAdamW standalone (ZeRO-2), and the bytes each rank sends per step with a "
        "lower bound on the time for DDP, flat and hybrid sharding. Pure arithmetic; the "
        "model behind it is described in sharded_adamw/tools/estimate.py. The tensors "
        "(their sizes set the buckets, the padding and the peak) come from your model "
        "(--model, --hf-config; built on the meta device, nothing allocated) or, from a "
        "count alone (--params), from an assumed decoder-only transformer, which is printed.",
    )
    source = est.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--params",
        type=parameter_count,
        help="number of trainable parameters, e.g. 7e9, 7B or 350M; the tensors are those of "
        "a LLaMA-style decoder of about that size (the split is printed) unless --num-tensors",
    )
    source.add_argument(
        "--model",
        type=factory_spec,
        metavar="MODULE:FACTORY",
        help="import MODULE and call FACTORY() on the meta device; it returns your model (an "
        "nn.Module) or what you give ShardedAdamW (an iterable of parameters, a list of param "
        "groups). Its tensors are used as they are: shapes, dtypes, requires_grad (frozen "
        "ones get no gradient or state) and groups (bucketed apart)",
    )
    source.add_argument(
        "--hf-config",
        metavar="CONFIG_JSON",
        help="a local Hugging Face config.json (or its folder): the model "
        "AutoModelForCausalLM.from_config builds from it (AutoModel if not a causal LM), on "
        "the meta device; needs transformers",
    )
    est.add_argument(
        "--world-size", type=positive, required=True, help="data-parallel ranks (GPUs) in all"
    )
    est.add_argument(
        "--dtype",
        choices=sorted(DTYPE_BYTES),
        default=None,
        help="parameter dtype; bf16/fp16 keep fp32 master weights and state (default: fp32 "
        "with --params; with --model or --hf-config each tensor's own dtype, which --dtype "
        "replaces, as model.to(dtype) would)",
    )
    est.add_argument(
        "--reduce-dtype",
        choices=sorted(DTYPE_BYTES),
        default=None,
        help="dtype ShardedAdamW averages gradients in (default: fp32 for "
        "bf16/fp16, else the parameter dtype)",
    )
    est.add_argument(
        "--state-dtype",
        choices=STATE_DTYPES,
        default=None,
        help="ShardedAdamW(state_dtype=...): AdamW's moments in fp32, in bf16 (2 B each "
        "where the update runs in fp32), or in blockwise int8 (1 B per element plus an fp32 "
        "scale per 256, for tensors of at least 4,096 elements; buckets of their own, "
        "aligned to whole blocks); the state buffers are then listed by name (default: fp32, "
        "and the report without that table)",
    )
    est.add_argument(
        "--master-remainders",
        action="store_true",
        help="ShardedAdamW(master_remainders=True): the fp32 master weights of bf16 "
        "parameters kept as 16-bit remainders and a bit (2.125 B per element instead of 4)",
    )
    est.add_argument(
        "--num-tensors",
        type=positive,
        default=None,
        help="with --params: split the parameters evenly over this many tensors instead of "
        "the assumed transformer's (padding is exact for that split)",
    )
    est.add_argument(
        "--replicas",
        type=positive,
        default=1,
        help="replicas of a replicate x shard mesh, for hybrid sharding (default: "
        "%(default)s); must divide --world-size; state is sharded world-size/replicas ways",
    )
    est.add_argument(
        "--gpus-per-node",
        type=positive,
        default=8,
        help="ranks per node, numbered node by node (default: %(default)s); a group "
        "within one node uses --intra-bw",
    )
    est.add_argument(
        "--intra-bw",
        type=bandwidth,
        default=200.0,
        help="intra-node bandwidth per rank and direction in GB/s, e.g. NVLink bus "
        "bandwidth from nccl-tests (default: %(default)g)",
    )
    est.add_argument(
        "--inter-bw",
        type=bandwidth,
        default=25.0,
        help="inter-node bandwidth per rank and direction in GB/s, e.g. 25 for one "
        "200 Gb/s NIC per GPU (default: %(default)g)",
    )

    ver = sub.add_parser(
        "verify",
        help="train DDP + ShardedAdamW and DDP + torch AdamW side by side and compare bits",
        description="Train a small model (embedding, linear, layernorm; no tensor size "
        "divides by 2..12 ranks, so padding is exercised) with DDP + ShardedAdamW (attached) "
        "and with DDP + torch.optim.AdamW from the same weights on the same data, then print "
        "each parameter's max abs and relative difference and whether it is bitwise equal. "
        "Run it under torchrun (torchrun --nproc_per_node K -m sharded_adamw.tools.cli verify) or "
        "as one process. Up to 2 ranks every parameter must be bitwise equal; from 3 ranks "
        "DDP's all-reduce and the reduce-scatter add the ranks' gradients in different "
        "orders, so a parameter may instead be within 1e-5 relative (max abs difference over "
        "max abs value). Exits with status 1 otherwise.",
    )
    ver.add_argument(
        "--steps", type=positive, default=20, help="training steps (default: %(default)s)"
    )
    ver.add_argument(
        "--standalone",
        action="store_true",
        help="compare ShardedAdamW standalone (ZeRO-2, its own reduce-scatter hooks) instead "
        "of attached to DDP",
    )
    ver.add_argument(
        "--world-size-check",
        action="store_true",
        help="fail unless run on at least 2 processes (a one-process run "
        "shards nothing, so it proves little)",
    )

    rep = sub.add_parser(
        "report",
        help="train a tiny model a few steps and print what ShardedAdamW holds and sends",
        description="Train a small model a few steps with ShardedAdamW and print report(opt): "
        "this rank's memory (opt.memory()) and the last step's communication "
        "(opt.comm_stats()). Run it under torchrun or as one process.",
    )
    rep.add_argument(
        "--steps", type=positive, default=3, help="training steps (default: %(default)s)"
    )
    rep.add_argument(
        "--attach",
        action="store_true",
        help="attach the optimizer to DDP (ZeRO-1) instead of standalone (ZeRO-2)",
    )
    rep.add_argument(
        "--replicas",
        type=positive,
        default=1,
        help="hybrid sharding over a (replicas, world size / replicas) mesh; must divide "
        "the world size (default: %(default)s)",
    )
    for sp in sub.choices.values():
        sp.set_defaults(subparser=sp)  # for errors found after parsing
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the arguments; errors exit with status 2 naming the argument."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "estimate":
        if args.world_size % args.replicas:
            args.subparser.error(
                f"argument --replicas: {args.replicas} does not divide "
                f"--world-size {args.world_size}"
            )
        if args.num_tensors is not None and args.params is None:
            given = "--model" if args.model else "--hf-config"
            args.subparser.error(
                f"argument --num-tensors: only with --params ({given} gives the model's own "
                "tensors)"
            )
        if args.num_tensors is not None and args.num_tensors > args.params:
            args.subparser.error(
                f"argument --num-tensors: {args.num_tensors:,} tensors cannot hold "
                f"--params {args.params:,} (each needs at least one element)"
            )
    return args


# ---- process group and the small model ------------------------------------------------------


def init_distributed() -> tuple[bool, torch.device]:
    """Join torchrun's process group, or make a one-process group; returns whether this call
    created the group (and must destroy it) and this rank's device."""
    created = not dist.is_initialized()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    if created:
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return created, device or torch.device("cpu")


class SmallModel(nn.Module):
    """Embedding, linear, layernorm and a head; every tensor size is a product of primes
    >= 13 (481, 377, 29, 1073, 37), so none divides evenly by 2..12 ranks."""

    def __init__(self, dim: int = 13, hidden: int = 29):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.up = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.up(self.emb(x)))))


def _groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices only, as training scripts do."""
    return [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: int, device: torch.device) -> None:
    """``steps`` steps on batches that depend only on (step, rank), so runs are comparable."""
    rank = dist.get_rank()
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randint(0, VOCAB, (8, 5), generator=g).to(device)
        logits = net(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x.roll(1, 1).reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()


def _ddp(model: nn.Module, device: torch.device) -> DDP:
    """``model`` in DDP on this rank's device."""
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


# ---- verify ----------------------------------------------------------------------------------


def verify(steps: int, device: torch.device, attach: bool = True) -> tuple[str, bool]:
    """Train both setups ``steps`` steps; return the comparison table and whether they agree.
    Collective: every rank must call it.

    Up to ``BITWISE_WORLD_SIZE`` ranks they agree only if every parameter is bitwise equal.
    Beyond, DDP's all-reduce and the reduce-scatter add the ranks' gradients in different
    orders (``(a + b) + c`` need not be ``a + (b + c)``), so the averaged gradient can differ
    in the last bit and Adam carries that on: a parameter that is not bitwise equal agrees
    if its max abs difference over its max abs value is at most ``REL_TOL``."""
    torch.manual_seed(0)
    ref_model = SmallModel().to(device)
    model = copy.deepcopy(ref_model)
    ref_net = _ddp(ref_model, device)
    net = _ddp(model, device) if attach else model
    lr = 1e-2
    ref_opt = torch.optim.AdamW(_groups(ref_model), lr=lr)
    opt = ShardedAdamW(_groups(model), lr=lr)
    if attach:
        opt.attach(net)
    _train(ref_net, ref_opt, steps, device)
    _train(net, opt, steps, device)
    world = dist.get_world_size()
    tolerant = world > BITWISE_WORLD_SIZE
    rows, n_equal, n_bad, worst, worst_rel = [], 0, 0, 0.0, 0.0
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters(), strict=True):
        diff = (p.detach().double() - q.detach().double()).abs().max().item()
        rel = diff / (p.detach().double().abs().max().item() or 1.0)
        equal = torch.equal(p, q)
        ok = equal or (tolerant and rel <= REL_TOL)
        n_equal += equal
        n_bad += not ok
        worst, worst_rel = max(worst, diff), max(worst_rel, rel)
        verdict = "yes" if equal else f"no, within {REL_TOL:g}" if ok else "NO"
        rows.append(
            [name, str(tuple(p.shape)), f"{p.numel():,}", f"{diff:.3g}", f"{rel:.3g}", verdict]
        )
    table = markdown_table(
        ["parameter", "shape", "numel", "max abs diff", "rel diff", "bitwise equal"], rows
    )
    if n_equal == len(rows):
        verdict = "all parameters bitwise equal"
    elif not n_bad:
        verdict = (
            f"{n_equal} of {len(rows)} parameters bitwise equal, the others within "
            f"{REL_TOL:g} relative (max {worst_rel:.3g}): at world size {world} DDP's "
            "all-reduce and the reduce-scatter add the ranks' gradients in different orders, "
            "so the averaged gradient can differ in the last bit"
        )
    else:
        limit = f"beyond {REL_TOL:g} relative" if tolerant else "not bitwise equal"
        verdict = (
            f"{n_bad} of {len(rows)} parameters differ, {limit} (max abs diff {worst:.3g}, "
            f"max rel diff {worst_rel:.3g})"
        )
    summary = (
        f"verify: world size {world}, {steps} steps, {dist.get_backend()}, "
        f"ShardedAdamW {'attached to DDP' if attach else 'standalone'} vs "
        f"DDP + torch.optim.AdamW: {verdict}"
    )
    return f"{table}\n\n{summary}", not n_bad


# ---- report ----------------------------------------------------------------------------------


def report(opt: ShardedAdamW) -> str:
    """This rank's memory (``opt.memory()``) and the last step's communication
    (``opt.comm_stats()``) as two markdown tables."""
    mem, comm = opt.memory(), opt.comm_stats()
    P = sum(p.numel() for g in opt.param_groups for p in g["params"] if p.requires_grad)
    per = lambda b: f"{b / P:.3f}" if P else "-"  # noqa: E731
    world, replicas = mem["world_size"], mem["replicas"]
    mesh = f"{world}-way" + (f" x {replicas} replicas" if replicas > 1 else "")
    memory_rows = [
        ("parameters (full, on every rank)", mem["param_bytes"]),
        ("gradient shard", mem["grad_shard_bytes"]),
        ("optimizer state, owned (opt.state)", mem["state_bytes"]),
        ("optimizer state, allocated (with padding)", mem["state_allocated_bytes"]),
    ]
    kinds = ("reduce_scatter", "all_gather", "all_reduce")
    total = sum(comm[f"{k}_bytes"] for k in kinds)
    comm_rows = [
        [
            k.replace("_", "-"),
            str(comm[f"{k}_calls"]),
            f"{comm[f'{k}_bytes']:,}",
            format_bytes(comm[f"{k}_bytes"]),
            per(comm[f"{k}_bytes"]),
        ]
        for k in kinds
    ]
    comm_rows.append(
        [
            "total",
            str(sum(comm[f"{k}_calls"] for k in kinds)),
            f"{total:,}",
            format_bytes(total),
            per(total),
        ]
    )
    return "\n".join(
        [
            f"ShardedAdamW, state sharded {mesh}, {P:,} trainable parameters",
            "",
            "## Memory on this rank",
            "",
            markdown_table(
                ["what", "bytes", "size", "B/param"],
                [[what, f"{b:,}", format_bytes(b), per(b)] for what, b in memory_rows],
            ),
            "",
            "## Communication in the last step (bytes counted as in collectives.py: full "
            "reduce-scatter input, full all-gather output, twice an all-reduce's buffer)",
            "",
            markdown_table(["collective", "calls", "bytes", "size", "B/param"], comm_rows),
        ]
    )


def _report_demo(steps: int, attach: bool, replicas: int, device: torch.device) -> str:
    """Train ``SmallModel`` ``steps`` steps with ShardedAdamW and return ``report(opt)``."""
    world = dist.get_world_size()
    group = None
    if replicas > 1:
        from torch.distributed.device_mesh import init_device_mesh

        group = init_device_mesh(
            device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard")
        )
    torch.manual_seed(0)
    model = SmallModel().to(device)
    net = _ddp(model, device) if attach else model
    opt = ShardedAdamW(_groups(model), lr=1e-2, process_group=group)
    if attach:
        opt.attach(net)
    _train(net, opt, steps, device)
    mode = "attached to DDP (ZeRO-1)" if attach else "standalone (ZeRO-2)"
    return f"report: {steps} steps, {mode}, world size {world}\n\n{report(opt)}"


# ---- entry point -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the ``sharded-adamw`` command line; returns the exit status."""
    args = parse_args(argv)
    if args.command == "estimate":
        tensors, source = None, ""
        if args.params is None:
            try:
                tensors, source = load_tensors(args.model, args.hf_config, args.dtype)
            except ModelError as e:
                flag = "--model" if args.model else "--hf-config"
                args.subparser.error(f"argument {flag}: {e}")
        print(
            render_estimate(
                args.params,
                args.world_size,
                args.dtype,
                num_tensors=args.num_tensors,
                tensors=tensors,
                source=source,
                replicas=args.replicas,
                gpus_per_node=args.gpus_per_node,
                intra_gbps=args.intra_bw,
                inter_gbps=args.inter_bw,
                reduce_dtype=args.reduce_dtype,
                state_dtype=args.state_dtype,
                master_remainders=args.master_remainders,
            )
        )
        return 0
    created, device = init_distributed()
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        if args.command == "verify":
            if args.world_size_check and world < 2:
                args.subparser.error(
                    f"argument --world-size-check: world size is {world}; "
                    "run under torchrun --nproc_per_node K with K >= 2"
                )
            text, ok = verify(args.steps, device, attach=not args.standalone)
            status = 0 if ok else 1
        else:
            if world % args.replicas:
                args.subparser.error(
                    f"argument --replicas: {args.replicas} does not divide the world size {world}"
                )
            text, status = _report_demo(args.steps, args.attach, args.replicas, device), 0
        if rank == 0:
            print(text)
        return status
    finally:
        if created:
            # DDP and the optimizers hold the group in reference cycles: free them (and wait
            # for every rank) before destroying it, or gloo can abort the process at exit
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
