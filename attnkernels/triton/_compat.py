"""The one place where the supported versions differ for the Triton modules: torch 2.11 with
Triton 3.6 (the oldest supported, the GPU machine's) and torch 2.14 with Triton 3.8 (CI's).
Each shim behaves as the newer version does, and says which version needs it and why, so it
can be dropped when the oldest supported version has the fix.

* `wrap_triton`: under the Triton interpreter (TRITON_INTERPRET=1, the CPU tests),
  `@triton.jit` returns an `InterpretedFunction`, not a `JITFunction`. torch 2.14 passes such
  a kernel through unchanged (pytorch/pytorch#152868); torch 2.11 rejects it ("wrap_triton
  only works on functions annotated with triton.jit or triton.autotune"), so every Triton op
  failed on CPU. Here an interpreted kernel is passed through on every torch, as 2.14 does.
* `triton_op(..., schema=...)`: torch 2.11 takes the argument but ignores it and infers the
  schema from the function's annotations (`int` becomes `SymInt`, the returns lose their
  names), so the Triton ops' schemas differed from the C++ library's. Here the schema given
  is the op's schema on every torch, as 2.14 does.
* `_dot` (device side): Triton 3.6's tl.dot defaults out_dtype to float32 and asserts that an
  accumulator has that dtype, so an fp64 `acc` (the fp64 kernels) failed to compile; Triton
  3.8 defaults out_dtype to acc's dtype. `_dot` passes acc's dtype: the same on both, so it
  needs no version check.
"""

from typing import Any, Callable

import torch
import torch._library.triton as _torch_triton
import triton
import triton.language as tl
from torch.library import triton_op as _torch_triton_op
from torch.library import wrap_triton as _torch_wrap_triton
from torch.torch_version import TorchVersion

# 2.14 is the first torch this project tests whose wrap_triton accepts interpreted kernels
# and whose triton_op honours schema=; 2.11 (the oldest supported) does neither.
_TORCH_2_14 = TorchVersion(torch.__version__) >= (2, 14)


def _is_interpreted(kernel: Callable) -> bool:
    """Whether kernel is what `@triton.jit` returns under the Triton interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def wrap_triton(kernel: Callable, /) -> Any:
    """torch.library.wrap_triton, which on torch < 2.14 returns an interpreted kernel as it is
    (what 2.14 does: the interpreter runs eagerly, there is nothing to trace)."""
    if not _TORCH_2_14 and _is_interpreted(kernel):
        return kernel
    return _torch_wrap_triton(kernel)


def triton_op(name: str, *, mutates_args: tuple[str, ...], schema: str) -> Callable:
    """torch.library.triton_op registering the op with `schema` (without the op's name), on
    torch < 2.14 too."""
    register = _torch_triton_op(name, mutates_args=mutates_args, schema=schema)
    if _TORCH_2_14:
        return register
    return lambda fn: _with_schema(register, fn, schema)


def _with_schema(register: Callable, fn: Callable, schema: str) -> Any:
    """register(fn) (torch < 2.14's triton_op decorator) with the schema it infers from fn
    replaced by `schema`: that triton_op calls its module's infer_schema once, and passes the
    result to custom_op as 2.14 passes schema=, so the op is registered as on 2.14."""
    inferred = _torch_triton.infer_schema
    _torch_triton.infer_schema = lambda *args, **kwargs: schema
    try:
        return register(fn)
    finally:
        _torch_triton.infer_schema = inferred


@triton.jit
def _dot(a, b, acc, IP: tl.constexpr):
    """acc + a @ b (tl.dot with input_precision IP) in acc's dtype, on Triton 3.6 too."""
    return tl.dot(a, b, acc, input_precision=IP, out_dtype=acc.dtype)
