"""Record the Triton launches the library makes, as specialisations `check.py` can compile.

Under the Triton interpreter (TRITON_INTERPRET=1) every launch goes through
`InterpretedFunction.run`; `record()` wraps it and keeps, per launch, what decides which
binary Triton would compile on a GPU: the kernel, each argument's type (a tensor's dtype and
whether its address is 16-byte aligned; an int's width, whether it is 1 and whether it is a
multiple of 16; floats, bools, None) and value where it is a constexpr, and the launch options
(num_warps, num_stages). Argument values that do not change the binary (sizes, strides,
addresses) are reduced to a representative with the same specialisation, so the record stays
small and is independent of the Triton version that reads it.

The record is a JSON list of such launch specs, merged under a file lock with what the file
already holds (several processes may record into one file).
"""
from __future__ import annotations

import atexit
import fcntl
import inspect
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch

# Options a launch passes beside the kernel's own parameters.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

_I32 = (-(2**31), 2**31)


def encode_arg(value: Any, is_constexpr: bool) -> Dict[str, Any]:
    """One argument's spec: what Triton specialises on, nothing more."""
    if is_constexpr:
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"constexpr of type {type(value).__name__} cannot be recorded: {value!r}")
        return {"constexpr": value}
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": representative_int(value)}
    if isinstance(value, float):
        return {"float": 1.5}
    if value is None:
        return {"none": None}
    raise TypeError(f"argument of type {type(value).__name__} cannot be recorded: {value!r}")


def representative_int(v: int) -> int:
    """An int with v's specialisation: 1 (a constexpr to Triton), else i32 or i64, each
    divisible by 16 or not."""
    if v == 1:
        return 1
    base = 0 if _I32[0] <= v < _I32[1] else 2**32
    return base + (16 if v % 16 == 0 else 17)


def kernel_id(fn: Any) -> str:
    """"module:qualname" of a @triton.jit function (the Python function it wraps)."""
    return f"{fn.__module__}:{fn.__qualname__}"


def launch_spec(fn: Any, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The spec of one launch of the Python kernel function `fn` with these arguments."""
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    signature = inspect.signature(fn)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    params = signature.parameters
    encoded = [
        encode_arg(value, "constexpr" in str(params[name].annotation))
        for name, value in bound.arguments.items()
    ]
    return {"kernel": kernel_id(fn), "args": encoded, "options": options}


def spec_key(spec: Dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


class Recorder:
    """Collects launch specs (deduplicated) and writes them to `path` at exit."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.specs: Dict[str, Dict[str, Any]] = {}
        self.dry = False

    def add(self, spec: Dict[str, Any]) -> None:
        self.specs.setdefault(spec_key(spec), spec)

    def write(self) -> None:
        if self.path is not None and self.specs:
            merge_into(self.path, self.specs.values())


def merge_into(path: Path, specs: Iterable[Dict[str, Any]]) -> None:
    """Add specs to the JSON list at path (created if missing), under an exclusive lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {spec_key(s): s for s in load(path)}
        merged.update((spec_key(s), s) for s in specs)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(sorted(merged.values(), key=spec_key), indent=0))
        os.replace(tmp, path)


def load(path: Path) -> List[Dict[str, Any]]:
    """The specs recorded at path ([] if there is no file)."""
    return json.loads(path.read_text()) if path.is_file() else []


_recorder: Optional[Recorder] = None


def record(path: Optional[Path] = None) -> Recorder:
    """Wrap the interpreter's launch so that every launch from now on is recorded (and, with
    `recorder.dry = True`, not executed: for big shapes whose numbers nobody reads).
    Idempotent; the specs are written to `path` at exit (if given)."""
    global _recorder
    if _recorder is not None:
        return _recorder
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("launches.record needs the Triton interpreter (TRITON_INTERPRET=1 before importing triton)")
    from triton.runtime.interpreter import InterpretedFunction

    recorder = Recorder(path)
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        recorder.add(launch_spec(self.fn, args, dict(kwargs)))
        if recorder.dry:
            return None
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    atexit.register(recorder.write)
    _recorder = recorder
    return recorder
