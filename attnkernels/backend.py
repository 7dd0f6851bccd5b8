"""Which backend runs a fused op, and why the others do not.

Backends: `cpu` (C++ kernels), `cuda` (CUDA C++ kernels), `triton`, and `reference`
(plain PyTorch, always available). For each hot path and device:

* an explicit choice wins: `with use_backend("triton"): ...`, else the environment
  variable `ATTNKERNELS_BACKEND`; it raises if that backend cannot run there;
* otherwise (`auto`), the first available of the device's preference order: on CPU the
  C++ kernels, then the reference (Triton on CPU is the interpreter: a test tool, never
  picked automatically); on CUDA the CUDA kernels, then Triton, then the reference.
* while `torch.onnx.export` traces a model, always the reference: an ONNX graph holds
  standard ops only, and the reference backend writes each fused op in them.

A compiled backend that cannot be built or loaded is reported once, with the reason and
the fix, and the next backend runs; results are never silently wrong. `explain()` prints,
per hot path and device, which backend runs and why each other one does not.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Iterator

import torch

from ._env import setting
from .ops import HOT_PATHS

BACKENDS = ("cpu", "cuda", "triton", "reference")
ENV_VAR = "ATTNKERNELS_BACKEND"
# The auto order per device type; the reference closes every list.
PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnkernels_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the fused ops in this block on backend `name`.

    "auto" (or None) chooses automatically, overriding ATTNKERNELS_BACKEND in the block.
    """
    token = _forced.set(_check_name(name, "use_backend(name)") or "auto")
    try:
        yield
    finally:
        _forced.reset(token)


def requested() -> str | None:
    """The explicit choice in force (context manager, then ATTNKERNELS_BACKEND), or None for auto."""
    forced = _forced.get()
    if forced is not None:
        return None if forced == "auto" else forced
    return _check_name(setting(ENV_VAR), ENV_VAR)


def _check_name(name: str | None, where: str) -> str | None:
    if name is None or name.strip().lower() in ("", "auto"):
        return None
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


def why_unavailable(backend: str, hot_path: str, device: torch.device | str) -> str | None:
    """None if `backend` can run `hot_path` on `device`, else the reason it cannot."""
    device = torch.device(device)
    if hot_path not in HOT_PATHS:
        raise ValueError(f"unknown hot path {hot_path!r}; expected one of {', '.join(HOT_PATHS)}")
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"runs {backend.upper()} tensors only"
        return _compiled_ops_problem(backend, hot_path)
    if backend == "triton":
        return _triton_problem(hot_path, device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _compiled_ops_problem(backend: str, hot_path: str) -> str | None:
    from . import _ext

    try:
        _ext.load()
    except _ext.ExtensionUnavailable as err:
        return str(err)
    if backend == "cuda" and not _ext.cuda_compiled():
        return "the compiled ops were built without CUDA kernels (CPU-only torch, or no nvcc at build time)"
    return _missing_kernels(backend, hot_path)


def _missing_kernels(backend: str, hot_path: str) -> str | None:
    """Why the loaded library cannot run `hot_path` on `backend`: a hot path's kernels may come
    one device at a time (its CPU kernels first), and an op with no kernel for the device would
    fail at its first call instead of falling back. Any op with a kernel there will do: some
    ops are CPU-only by design (ham_spatial_conv, ham_attention; tests/test_build.py)."""
    from .ops._schemas import schemas

    key = backend.upper()
    has_kernel = torch._C._dispatch_has_computed_kernel_for_dispatch_key  # composites count
    if any(has_kernel(f"attnkernels::{op}", key) for op in schemas(hot_path)):
        return None
    return f"no {key} kernels for {hot_path} yet"


def _triton_problem(hot_path: str, device: torch.device) -> str | None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1 before import)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type}"
    try:
        if importlib.util.find_spec(f"attnkernels.triton.{hot_path}") is None:
            return f"no kernels for {hot_path} yet"
        importlib.import_module(f"attnkernels.triton.{hot_path}")  # registers its ops
    except ImportError as err:
        return f"Triton is not importable: {err}"
    return None


def select(hot_path: str, device: torch.device) -> str:
    """The backend that runs `hot_path` on `device` now.

    Under torch.compile the choice is made once, while tracing, and baked into the graph
    (call `torch._dynamo.reset()` after changing backends).
    """
    if exporting_to_onnx():
        return "reference"
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _select(hot_path, device_type, requested())


def exporting_to_onnx() -> bool:
    """Whether `torch.onnx.export` is tracing now (`torch.onnx.is_in_onnx_export`, for the
    dynamo and the TorchScript exporter). torch.onnx is imported only by its users: when it
    is not loaded, no export runs, and importing it here would slow every call."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


# What torch.compiler.assume_constant_result(select) does (dynamo calls `select` while
# tracing and keeps its string result as a constant), without importing dynamo, which would
# double the import time of attnkernels. tests/test_channel_gate.py's fullgraph compile
# tests fail if torch ever changes this mechanism.
select._dynamo_marked_constant = True


@functools.lru_cache(maxsize=None)
def _select(hot_path: str, device_type: str, forced: str | None) -> str:
    device = torch.device(device_type)
    if forced is not None:
        problem = why_unavailable(forced, hot_path, device)
        if problem is not None:
            raise RuntimeError(
                f"attnkernels: backend {forced!r} was requested for {hot_path} on {device_type} but {problem}"
            )
        return forced
    for backend in PREFERENCE.get(device_type, ("reference",)):
        problem = why_unavailable(backend, hot_path, device)
        if problem is None:
            return backend
        if backend in ("cpu", "cuda"):  # a compiled backend that should have run: say so
            _warn_unavailable(backend, problem)
    return "reference"


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_unavailable(backend: str, problem: str) -> None:
    """Warn that a compiled backend cannot run, once per process for each problem.

    `_select` is cached per hot path, and every hot path meets the same unavailable library,
    so without this set each would repeat the warning, whatever the warnings filter; the same
    problem on CPU and on CUDA tensors is one warning too.
    """
    with _warned_lock:
        if problem in _warned:
            return
        _warned.add(problem)
    message = f"attnkernels: the {backend} backend is unavailable: {_sentence(problem)} Falling back."
    warnings.warn(message, stacklevel=5)  # past this helper, _select, select and backend_ops


def _sentence(problem: str) -> str:
    """`problem` as a sentence inside the warning: no second "attnkernels:", a closing period."""
    if problem.startswith("attnkernels: "):
        problem = problem[len("attnkernels: "):]
    return problem if problem.endswith(".") else problem + "."


def explain(device: torch.device | str | None = None) -> str:
    """A report, per hot path and device, of the backend that runs and why the others do not."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    lines = [f"attnkernels backends (requested: {requested() or 'auto'})"]
    for dev in devices:
        for hot_path in HOT_PATHS:
            try:
                chosen = select(hot_path, dev)
            except RuntimeError as err:
                chosen = f"none ({err})"
            lines.append(f"{hot_path} on {dev.type}: runs {chosen}")
            for backend in BACKENDS:
                problem = why_unavailable(backend, hot_path, dev)
                state = "available" if problem is None else f"unavailable: {problem}"
                lines.append(f"  {backend:<9} {state}")
    from . import choose  # the algorithm choices within a backend, measured or static

    return "\n".join(lines) + "\n" + choose.explain()
