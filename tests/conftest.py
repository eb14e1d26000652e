"""The ``distributed`` marker: which tests start processes.

``python -m pytest -m "not distributed"`` runs the single-process unit tests (seconds);
``python -m pytest -m distributed`` runs the tests that start processes: gloo spawns through
``tests/distributed.py``, torchrun, scripts run with ``subprocess``. The two add up to the suite.

A test is marked at collection when it, or a fixture it uses, starts processes: found by
following the names that its code (and the code of the test-suite functions and classes it
names, transitively) refers to, down to ``subprocess``, ``multiprocessing``,
``torch.multiprocessing`` or ``os.fork``/``os.system``-like calls. A test can also be marked by
hand with ``@pytest.mark.distributed`` (or ``pytestmark``) where this misses it.

The split is enforced: in a test without the marker, starting a process (``subprocess.Popen``,
``multiprocessing``'s ``Process.start``) fails the test with a message saying to mark it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import multiprocessing.process
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Modules whose use means starting processes; and os's functions that start one.
SPAWN_MODULES = (
    "subprocess",
    "multiprocessing",
    "torch.multiprocessing",
    "concurrent.futures.process",
)
OS_SPAWNERS = frozenset(
    {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp"}
    | {f"spawn{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")}
    | {f"exec{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")}
)


# ---- collection: mark the tests that start processes -------------------------------------


@functools.cache
def _is_test_file(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(TESTS)


def _in_tests(obj) -> bool:
    """``obj`` (a function, class or module) is defined in a file of the test suite."""
    code = getattr(obj, "__code__", None)
    if code is not None:
        return _is_test_file(code.co_filename)
    if not isinstance(obj, types.ModuleType):
        obj = sys.modules.get(getattr(obj, "__module__", None) or "")
    return _is_test_file(getattr(obj, "__file__", None))


def _is_spawn_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in SPAWN_MODULES)


def _names(code: types.CodeType) -> set[str]:
    """The global and attribute names ``code`` and the code nested in it refer to."""
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _names(c)
    return out


@functools.cache
def _submodule(package: str, name: str) -> types.ModuleType | None:
    """``package.name`` if it is a module (imported here if a function imports it lazily)."""
    full = f"{package}.{name}"
    if full not in sys.modules:
        try:
            if importlib.util.find_spec(full) is None:
                return None
            importlib.import_module(full)
        except Exception:  # noqa: BLE001 - not a module we can follow
            return None
    return sys.modules.get(full)


_cache: dict[object, bool] = {}


def _starts_processes(obj, stack: frozenset = frozenset()) -> bool:
    """Whether calling ``obj`` (a test-suite function or class) can start a process. Over-
    approximates: any reference counts, called or not; the runtime guard catches misses."""
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if obj in _cache:
        return _cache[obj]
    if obj in stack:  # recursion: decided by the outer call
        return False
    stack = stack | {obj}
    if isinstance(obj, type):
        members = [getattr(m, "__func__", m) for m in vars(obj).values()]
        members += [m.fget for m in vars(obj).values() if isinstance(m, property)]
        found = any(
            isinstance(m, types.FunctionType) and _starts_processes(m, stack) for m in members
        )
    elif isinstance(obj, types.FunctionType):
        names = _names(obj.__code__)
        found = any(_is_spawn_module(n) for n in names) or any(  # ``import subprocess`` in it
            _refers_to_spawning(_resolve(obj, n), names, stack) for n in names
        )
    else:
        found = False
    if found or len(stack) == 1:  # a "no" found inside a cycle may be a cut-short one
        _cache[obj] = found
    return found


def _resolve(func: types.FunctionType, name: str):
    """What ``name`` in ``func``'s code refers to: a global, or a test-suite module that the
    function imports itself (``from . import distributed``); None for other names."""
    ref = func.__globals__.get(name)
    package = func.__globals__.get("__package__")
    if ref is None and package:
        ref = _submodule(package, name)
    return ref


def _refers_to_spawning(ref, names: set[str], stack: frozenset) -> bool:
    if ref is None:
        return False
    if isinstance(ref, types.ModuleType):
        if _is_spawn_module(ref.__name__):
            return True
        if ref is os:
            return bool(names & OS_SPAWNERS)
        if _in_tests(ref):
            # a test-suite module used as ``module.attr``: follow the attributes named
            members = (getattr(ref, n, None) for n in names)
            return any(
                isinstance(m, (types.FunctionType, type))
                and _in_tests(m)
                and _starts_processes(m, stack)
                for m in members
            )
        return False
    if isinstance(ref, (types.FunctionType, types.BuiltinFunctionType, type)):
        module = getattr(ref, "__module__", None) or ""
        if _is_spawn_module(module):
            return True  # ``from subprocess import run`` and the like
        if module in ("os", "posix") and ref.__name__ in OS_SPAWNERS:
            return True  # ``from os import fork``
        if _in_tests(ref):
            return _starts_processes(ref, stack)
    return False


def _fixture_functions(item: pytest.Item):
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info else ():
        for fixturedef in defs:
            func = getattr(fixturedef, "func", None)
            if func is not None and _in_tests(inspect.unwrap(func)):
                yield func


def starts_processes(item: pytest.Item) -> bool:
    """Whether ``item``'s test function or one of the fixtures it uses starts processes."""
    funcs = [getattr(item, "function", None), *_fixture_functions(item)]
    return any(f is not None and _starts_processes(f) for f in funcs)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("distributed") is None and starts_processes(item):
            item.add_marker(pytest.mark.distributed)


# ---- run time: a test without the marker must not start a process -----------------------


class _Guard:
    """While active, ``subprocess.Popen`` and ``multiprocessing``'s ``Process.start`` fail the
    current test (raising ``pytest.fail``'s exception, which ``except Exception`` does not
    swallow) and record the attempt, so one made on another thread fails the test too."""

    def __init__(self) -> None:
        self.active: str | None = None  # the node id of the guarded test
        self.attempts: list[str] = []
        self._lock = threading.Lock()
        self._popen_init = subprocess.Popen.__init__
        self._process_start = multiprocessing.process.BaseProcess.start
        guard = self

        def popen_init(popen, args, *a, **kw):
            guard.check(f"subprocess.Popen({args!r})")
            return guard._popen_init(popen, args, *a, **kw)

        def process_start(process):
            guard.check(f"multiprocessing Process.start() of {process!r}")
            return guard._process_start(process)

        subprocess.Popen.__init__ = popen_init
        multiprocessing.process.BaseProcess.start = process_start

    def check(self, what: str) -> None:
        test = self.active
        if test is None:
            return
        message = (
            f"{test} started a process ({what}) but is not marked distributed: mark it "
            "@pytest.mark.distributed (see tests/conftest.py), so that "
            '`pytest -m "not distributed"` stays single-process'
        )
        with self._lock:
            self.attempts.append(message)
        pytest.fail(message, pytrace=False)

    def restore(self) -> None:
        subprocess.Popen.__init__ = self._popen_init
        multiprocessing.process.BaseProcess.start = self._process_start


_guard: _Guard | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _guard
    _guard = _Guard()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _guard
    if _guard is not None:
        _guard.restore()
        _guard = None


def _guarded(item: pytest.Item):
    if _guard is None or item.get_closest_marker("distributed") is not None:
        return (yield)
    _guard.active, _guard.attempts = item.nodeid, []
    try:
        result = yield
    finally:
        _guard.active = None
    if _guard.attempts:  # made on a thread, or caught by the test
        pytest.fail(_guard.attempts[0], pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    return (yield from _guarded(item))
