"""Issue 22: importing ``sharded_adamw`` changes nothing in torch; the integrations (torch's
clipping routed, DDP auto-attach, accelerate) are installed at the first ``ShardedAdamW``
construction, by ``sharded_adamw/integrations/install.py``, and can be turned off.

Import state is per interpreter, so each scenario runs as a script in a fresh one (no process
group, or a gloo group of one rank over a ``HashStore``) and prints what it saw as JSON; the
tests read it. Scripts live in files so that warnings have a real file and line to name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# What the scripts share: a snapshot of what the package could change in torch.
COMMON = '''
import inspect, json, os, sys, warnings
import torch, torch.nn as nn, torch.nn.utils, torch.nn.utils.clip_grad as clip_grad
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

CLIPS = ("clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_", "get_total_norm")
TORCH_CALLABLES = [
    *(f"torch.nn.utils.{n}" for n in CLIPS),
    *(f"clip_grad.{n}" for n in CLIPS if hasattr(clip_grad, n)),
    "DDP.__init__",
]


def snap():
    """id() of each routed torch callable and of each finder on sys.meta_path."""
    s = {name: id(eval(name)) for name in TORCH_CALLABLES}
    s["sys.meta_path"] = [id(f) for f in sys.meta_path]
    return s


def changed(a, b):
    return sorted(k for k in a if a[k] != b[k])


def described(name):
    """What functools.wraps must keep: signature and metadata."""
    f = eval(name)
    return [str(inspect.signature(f)), f.__name__, f.__qualname__, f.__module__, f.__doc__]


def torch_wide():
    """id() of every callable attribute of every loaded torch module, and of the attributes of
    the classes those modules define (to catch any patch, not only the known ones)."""
    out = {}
    for name, mod in list(sys.modules.items()):
        if not (name == "torch" or name.startswith("torch.")) or mod is None:
            continue
        try:
            items = list(vars(mod).items())
        except TypeError:
            continue
        for k, v in items:
            if not callable(v):
                continue
            out[f"{name}:{k}"] = id(v)
            if isinstance(v, type) and v.__module__ == name:
                for a, m in list(vars(v).items()):
                    if callable(m) or isinstance(m, (staticmethod, classmethod, property)):
                        out[f"{name}:{k}.{a}"] = id(m)
    return out


def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def line(marker):
    """The line of this script that carries ``# <marker>``."""
    with open(__file__) as f:
        return next(i for i, t in enumerate(f, 1) if t.rstrip().endswith("# " + marker))


def where(caught, text):
    """(file, line) of each caught warning whose message contains ``text``."""
    return [[w.filename, w.lineno] for w in caught if text in str(w.message)]
'''


def _run(tmp_path: Path, name: str, body: str, env: dict | None = None) -> dict:
    """Run ``COMMON + body`` as ``<tmp_path>/<name>.py`` in a fresh interpreter; the JSON it
    prints last, with the script's path under ``"file"``."""
    script = tmp_path / f"{name}.py"
    script.write_text(COMMON + textwrap.dedent(body))
    environ = {k: v for k, v in os.environ.items() if k != "SHARDED_ADAMW_PATCH_TORCH"}
    environ.update(PYTHONPATH=str(ROOT), **(env or {}))
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environ,
        timeout=300,
    )
    assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr}"
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "file": str(script)}


TORCH_MODULES = """
import importlib, pkgutil, sharded_adamw

for m in pkgutil.walk_packages(sharded_adamw.__path__, "sharded_adamw."):
    importlib.import_module(m.name)
print(json.dumps({"torch_modules": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
"""

LIFECYCLE = """
import importlib, importlib.util, pkgutil
# torch's modules that the package imports, imported first: some change torch themselves
# (torch._dynamo rebinds torch.manual_seed), which is not the package's doing
for name in TORCH_MODULES:
    try:
        importlib.import_module(name)
    except Exception:
        pass
out = {"accelerate_findable": importlib.util.find_spec("accelerate") is not None}
before, wide_before = snap(), torch_wide()
originals = {n: described(n) for n in TORCH_CALLABLES}

import sharded_adamw
from sharded_adamw.integrations import install

for m in pkgutil.walk_packages(sharded_adamw.__path__, "sharded_adamw."):
    importlib.import_module(m.name)
out["modules"] = sorted(m for m in sys.modules if m.startswith("sharded_adamw"))
out["after_import"] = changed(before, snap())
after = torch_wide()
out["torch_wide_after_import"] = sorted(k for k in wide_before if after.get(k) != wide_before[k])
out["accelerate_imported"] = "accelerate" in sys.modules

model = nn.Linear(4, 3)
opt = sharded_adamw.ShardedAdamW(model.parameters())
installed = snap()
out["installed"] = install.installed()
out["after_first_optimizer"] = changed(before, installed)
wide = torch_wide()
out["torch_wide_after_first_optimizer"] = sorted(
    k for k in wide_before if wide.get(k) != wide_before[k]
)
out["one_wrapper_per_function"] = torch.nn.utils.clip_grad_norm_ is clip_grad.clip_grad_norm_
out["signatures_kept"] = {n: described(n) == originals[n] for n in TORCH_CALLABLES}

# routed: torch's call on the optimizer's parameters clips the sharded gradient
ref = nn.Linear(4, 3)
ref.load_state_dict(model.state_dict())
x = torch.randn(5, 4)
model(x).square().sum().backward()
ref(x).square().sum().backward()
out["grad_is_none"] = model.weight.grad is None
out["norms"] = [
    float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)),
    float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)),
]
opt.step()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.nn.utils.clip_grad_norm_((p for p in ()), 1.0)  # EMPTY
out["empty_generator"] = where(caught, "empty generator")
out["empty_line"] = line("EMPTY")

install.uninstall()
out["after_uninstall"] = changed(before, snap())
out["installed_after_uninstall"] = install.installed()
wide = torch_wide()
out["torch_wide_after_uninstall"] = sorted(k for k in wide_before if wide.get(k) != wide_before[k])
sharded_adamw.ShardedAdamW(nn.Linear(2, 2).parameters())
out["after_uninstall_and_new_optimizer"] = changed(before, snap())
install.install()
again = snap()
out["after_install_again"] = changed(before, again)
install.install()
out["install_idempotent"] = changed(again, snap())
install.uninstall()
out["after_second_uninstall"] = changed(before, snap())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    modules = _run(tmp, "torch_modules", TORCH_MODULES)["torch_modules"]
    return _run(tmp, "lifecycle", f"TORCH_MODULES = {modules!r}\n" + LIFECYCLE)


ROUTED = [
    "torch.nn.utils.clip_grad_norm_",
    "torch.nn.utils.clip_grads_with_norm_",
    "torch.nn.utils.clip_grad_value_",
    "torch.nn.utils.get_total_norm",
    *(f"clip_grad.{n}" for n in ("clip_grad_norm_", "clip_grad_value_")),
    "DDP.__init__",
]


@pytest.mark.distributed
def test_importing_every_module_of_the_package_changes_nothing_in_torch(lifecycle):
    assert "sharded_adamw.integrations.install" in lifecycle["modules"]
    assert "sharded_adamw.tools.cli" in lifecycle["modules"]
    assert lifecycle["after_import"] == []
    assert lifecycle["torch_wide_after_import"] == []
    assert not lifecycle["accelerate_imported"]


@pytest.mark.distributed
def test_the_first_optimizer_installs_the_integrations(lifecycle):
    assert lifecycle["installed"]
    changed = set(lifecycle["after_first_optimizer"])
    assert set(ROUTED) <= changed
    # accelerate installed but not imported: a finder waits for its import
    assert ("sys.meta_path" in changed) == lifecycle["accelerate_findable"]
    assert lifecycle["one_wrapper_per_function"]
    # the torch-wide comparison sees them too (and nothing else)
    assert set(lifecycle["torch_wide_after_first_optimizer"]) == {
        "torch.nn.utils:clip_grad_norm_",
        "torch.nn.utils:clip_grads_with_norm_",
        "torch.nn.utils:clip_grad_value_",
        "torch.nn.utils:get_total_norm",
        "torch.nn.utils.clip_grad:clip_grad_norm_",
        "torch.nn.utils.clip_grad:clip_grad_value_",
        "torch.nn.parallel.distributed:DistributedDataParallel.__init__",
    }


@pytest.mark.distributed
def test_the_wrappers_keep_torch_signatures_and_metadata(lifecycle):
    assert all(lifecycle["signatures_kept"].values()), lifecycle["signatures_kept"]


@pytest.mark.distributed
def test_torch_clip_on_the_optimizer_parameters_clips_the_shards(lifecycle):
    assert lifecycle["grad_is_none"]  # a standalone ShardedAdamW keeps no p.grad
    ours, torchs = lifecycle["norms"]
    assert abs(ours - torchs) <= 1e-6 * torchs


@pytest.mark.distributed
def test_routed_clip_warns_like_torch_at_the_caller_line(lifecycle):
    assert lifecycle["empty_generator"] == [[lifecycle["file"], lifecycle["empty_line"]]]


@pytest.mark.distributed
def test_uninstall_restores_torch_and_stays_uninstalled(lifecycle):
    assert lifecycle["after_uninstall"] == []
    assert lifecycle["torch_wide_after_uninstall"] == []
    assert not lifecycle["installed_after_uninstall"]
    assert lifecycle["after_uninstall_and_new_optimizer"] == []
    assert set(ROUTED) <= set(lifecycle["after_install_again"])
    assert lifecycle["install_idempotent"] == []
    assert lifecycle["after_second_uninstall"] == []


OPT_OUT = """
one_rank_group()
before = snap()
import sharded_adamw
from sharded_adamw.integrations import install

out = {}
# 1. the environment variable, read at the first construction
model = nn.Linear(4, 3)
opt = sharded_adamw.ShardedAdamW(model.parameters())
ddp = DDP(model)
out["env"] = {"changed": changed(before, snap()), "installed": install.installed(),
              "attached": opt.attached_model is not None}
opt.attach(ddp)  # what the user does instead
ddp(torch.randn(5, 4)).square().sum().backward()
out["env"]["manual_norm"] = float(opt.clip_grad_norm_(1.0))
opt.step()
opt.zero_grad()
# 2. disable(), with the variable gone
del os.environ["SHARDED_ADAMW_PATCH_TORCH"]
install.disable()
model = nn.Linear(4, 3)
opt = sharded_adamw.ShardedAdamW(model.parameters())
DDP(model)
out["disable"] = {"changed": changed(before, snap()), "installed": install.installed(),
                  "attached": opt.attached_model is not None}
print(json.dumps(out))
"""


@pytest.mark.distributed
@pytest.mark.parametrize("value", ["0", "off"])
def test_the_opt_out_leaves_torch_untouched(tmp_path, value):
    out = _run(tmp_path, "opt_out", OPT_OUT, env={"SHARDED_ADAMW_PATCH_TORCH": value})
    for how in ("env", "disable"):
        assert out[how]["changed"] == [], how
        assert not out[how]["installed"], how
        assert not out[how]["attached"], how
    assert out["env"]["manual_norm"] > 0


DDP_ORDERS = """
one_rank_group()
before_import = DDP(nn.Linear(4, 3))  # built before import sharded_adamw
import sharded_adamw

out = {}
opt = sharded_adamw.ShardedAdamW(before_import.module.parameters())
out["built_before_import"] = opt.attached_model is before_import
model = nn.Linear(4, 3)
opt_first = sharded_adamw.ShardedAdamW(model.parameters())
after = DDP(model)
out["built_after_optimizer"] = opt_first.attached_model is after
for net, o in ((before_import, opt), (after, opt_first)):
    net(torch.randn(5, 4)).square().sum().backward()
    o.step()
    o.zero_grad()
out["trained"] = True



# torch's warning inside DDP's constructor names the caller's line, not the wrapper
class Sub(DDP):
    def __init__(self, module):
        super().__init__(module, check_reduction=True)  # SUPER


with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    DDP(nn.Linear(2, 2), check_reduction=True)  # DIRECT
    Sub(nn.Linear(2, 2))
out["direct"] = where(caught, "check_reduction")
out["lines"] = {m: line(m) for m in ("DIRECT", "SUPER", "LOOP", "OTHER", "PARTIAL", "OPT")}

# filters see the user's module and line: the "default" action (shown per location), and a
# filter on the module (the script is __main__)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    DDP(nn.Linear(2, 2), check_reduction=True)  # LOOP
    DDP(nn.Linear(2, 2), check_reduction=True)  # OTHER
    warnings.filterwarnings("ignore", category=FutureWarning, module="__main__")
    DDP(nn.Linear(2, 2), check_reduction=True)
out["default_action"] = where(caught, "check_reduction")

# our own warnings name the user's line too: DDP over part of an optimizer's parameters,
# after it and before it
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    two = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    partial_opt = sharded_adamw.ShardedAdamW(two.parameters())
    DDP(two[0])  # PARTIAL
    three = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    kept = DDP(three)
    sharded_adamw.ShardedAdamW(three[0].parameters())  # OPT
out["ours"] = where(caught, "not attached to")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ddp_orders(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ddp"), "ddp_orders", DDP_ORDERS)


@pytest.mark.distributed
def test_ddp_built_before_the_first_optimizer_even_before_import_is_attached(ddp_orders):
    assert ddp_orders["built_before_import"]
    assert ddp_orders["trained"]


@pytest.mark.distributed
def test_ddp_built_after_the_optimizer_is_attached(ddp_orders):
    assert ddp_orders["built_after_optimizer"]


@pytest.mark.distributed
def test_torch_warnings_in_ddp_constructor_name_the_user_line(ddp_orders):
    file, lines = ddp_orders["file"], ddp_orders["lines"]
    assert ddp_orders["direct"] == [[file, lines["DIRECT"]], [file, lines["SUPER"]]]
    assert ddp_orders["default_action"] == [[file, lines["LOOP"]], [file, lines["OTHER"]]]


@pytest.mark.distributed
def test_pairing_warnings_name_the_user_line(ddp_orders):
    file, lines = ddp_orders["file"], ddp_orders["lines"]
    assert ddp_orders["ours"] == [[file, lines["PARTIAL"]], [file, lines["OPT"]]]


ACCELERATE_AFTER = """
import sharded_adamw
from sharded_adamw.integrations import install

out = {"imported_at_start": "accelerate" in sys.modules}
before = snap()
sharded_adamw.ShardedAdamW(nn.Linear(2, 2).parameters())
finders = [type(f).__name__ for f in sys.meta_path if id(f) not in before["sys.meta_path"]]
out["finders_added"] = finders
from accelerate import Accelerator

prepare = Accelerator.prepare
out["patched"] = "sharded_adamw" in prepare.__code__.co_filename
out["signature_kept"] = [str(inspect.signature(prepare)),
                         str(inspect.signature(prepare.__wrapped__))]
out["finder_gone"] = snap()["sys.meta_path"] == before["sys.meta_path"]
install.uninstall()
out["restored"] = Accelerator.prepare is prepare.__wrapped__
print(json.dumps(out))
"""

ACCELERATE_BEFORE = """
from accelerate import Accelerator
from torch.nn.utils import clip_grad_norm_ as early_clip  # will not be routed

prepare = Accelerator.prepare
import sharded_adamw

out = {"unchanged_on_import": Accelerator.prepare is prepare}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sharded_adamw.ShardedAdamW(nn.Linear(2, 2).parameters())  # FIRST
out["patched"] = Accelerator.prepare.__wrapped__ is prepare
stale = [w for w in caught if "own clipping" in str(w.message)]
out["stale"] = [[str(w.message), w.filename, w.lineno] for w in stale]
out["first_line"] = line("FIRST")
print(json.dumps(out))
"""


@pytest.mark.distributed
def test_accelerate_imported_after_the_first_optimizer_is_patched(tmp_path):
    pytest.importorskip("accelerate")
    out = _run(tmp_path, "accelerate_after", ACCELERATE_AFTER)
    assert not out["imported_at_start"]
    assert out["finders_added"] == ["_AfterImport"]
    assert out["patched"]
    assert out["signature_kept"][0] == out["signature_kept"][1]
    assert out["finder_gone"]
    assert out["restored"]


@pytest.fixture(scope="module")
def accelerate_before(tmp_path_factory):
    pytest.importorskip("accelerate")
    return _run(tmp_path_factory.mktemp("acc"), "accelerate_before", ACCELERATE_BEFORE)


@pytest.mark.distributed
def test_accelerate_imported_before_the_package_is_patched_at_the_first_optimizer(
    accelerate_before,
):
    out = accelerate_before
    assert out["unchanged_on_import"]
    assert out["patched"]


@pytest.mark.distributed
def test_install_warns_about_a_clipping_function_imported_before_it(accelerate_before):
    """The known limit made loud: ``from torch.nn.utils import clip_grad_norm_`` before the
    first optimizer holds torch's unrouted function."""
    out = accelerate_before
    [(message, file, lineno)] = out["stale"]
    assert "__main__.early_clip" in message
    assert [file, lineno] == [out["file"], out["first_line"]]


def test_clip_routed_needs_no_install():
    """Under the opt-out, ``clip.routed`` gives the routed function without setting it."""
    from sharded_adamw.integrations.clip import routed

    fn = routed("clip_grad_value_")
    assert isinstance(fn, types.FunctionType)
    assert fn.__name__ == "clip_grad_value_"
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 5.0)
    fn([p], 1.0)  # not a ShardedAdamW's parameter: torch's own function runs
    assert torch.equal(p.grad, torch.ones(2))
