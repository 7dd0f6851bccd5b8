"""Compile one recorded launch spec for a GPU target, without a GPU, and read what ptxas says.

Runs in a worker process with TRITON_INTERPRET=0, so the library's kernels are JITFunctions.
The spec's arguments become stand-ins with the same specialisation (a MockTensor of the dtype,
at an aligned or unaligned address; the representative int), and Triton's own binder turns
them into the signature, constexprs and attributes, exactly as a launch on the device would;
`triton.compile` then runs every stage down to the cubin with Triton's bundled ptxas.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
from typing import Any, Dict, List

os.environ["TRITON_INTERPRET"] = "0"
# ptxas runs with -v (Triton passes it); this makes Triton print its report.
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
# Compile every time: a cache hit would skip ptxas and its report (check.py caches results).
os.environ["TRITON_ALWAYS_COMPILE"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: E402


class _Tensor(MockTensor):
    """A tensor stand-in at a chosen address (Triton specialises on 16-byte alignment)."""

    def __init__(self, dtype: torch.dtype, aligned: bool) -> None:
        super().__init__(dtype)
        self._ptr = 0 if aligned else 8

    def data_ptr(self) -> int:
        return self._ptr


def _stand_in(arg: Dict[str, Any]) -> Any:
    if "tensor" in arg:
        return _Tensor(getattr(torch, arg["tensor"]), arg["aligned"])
    (kind, value), = arg.items()
    return value  # constexpr, int, float, bool, none: the recorded value stands in


def jit_function(kernel: str):
    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{kernel} is a {type(fn).__name__}, not a JITFunction (TRITON_INTERPRET must be 0)")
    return fn


_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> Dict[str, int]:
    """Registers, stack frame and spill bytes (per thread) from a one-kernel `ptxas -v` report."""
    used, spills = _USED.search(log), _SPILLS.search(log)
    if used is None or spills is None:
        raise ValueError(f"no ptxas -v report in the compile's output:\n{log[-2000:]}")
    return {
        "registers": int(used.group(1)),
        "stack": int(spills.group(1)),
        "spill_stores": int(spills.group(2)),
        "spill_loads": int(spills.group(3)),
    }


def compile_spec(spec: Dict[str, Any], arch: int) -> Dict[str, Any]:
    """Compile spec for sm_<arch>; its registers, spills and shared memory, or the error."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = jit_function(spec["kernel"])
    args: List[Any] = [_stand_in(a) for a in spec["args"]]
    kwargs = dict(spec["options"])
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as err:  # the compiler's message is the result
        text = f"{type(err).__name__}: {err}"
        return {"error": text[:4000]}
    return {**parse_ptxas(out.getvalue()), "shared": int(compiled.metadata.shared)}
