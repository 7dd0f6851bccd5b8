"""Exporting models with fused modules: `torch.jit.trace`, `torch.export`, ONNX.

* `torch.jit.trace(model, x)` works as for the reference modules. The trace records the fused
  ops and the path that supports autograd, so the traced module runs with autograd on or off.
  A saved trace loads with `jit_load` (TorchScript resolves the fused ops as it loads).
* `torch.onnx.export(model, (x,), dynamo=True)` (and the TorchScript exporter) works as is:
  while it traces, every hot path runs on the `reference` backend
  (`attnkernels.backend.exporting_to_onnx`), whose plain torch ops ONNX has.
* `torch.export.export(model, (x,))` keeps the fused ops in the graph (AOTInductor runs them
  there). To turn such an ExportedProgram into standard ops, e.g. before passing it to
  `torch.onnx.export`, run `program.run_decompositions(decompositions())`.

The decompositions are not put in torch's global decomposition table, where the ONNX
exporter would find them by itself: FakeTensor prefers that table over an op's registered
fake under dynamic shapes, so torch.compile would then trace the reference math to get the
fused ops' output shapes.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO

import torch

from .ops import HOT_PATHS, hot_path_module
from .ops._common import NAMESPACES

__all__ = ["decompositions", "jit_load"]


def jit_load(
    f: str | os.PathLike | IO[bytes], map_location: str | torch.device | None = None, **kwargs
) -> torch.jit.ScriptModule:
    """`torch.jit.load(f, map_location, **kwargs)` for a saved trace of a model with fused
    modules. TorchScript resolves every op of the saved code as it loads it, so the compiled
    ops are loaded first (built on first use). A trace recorded on the Triton backend also
    needs its `attnkernels.triton.<hot_path>` modules imported."""
    from . import _ext

    _ext.load()
    return torch.jit.load(f, map_location=map_location, **kwargs)


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """Each registered fused op (both namespaces, C++ and Triton) mapped to its plain-PyTorch
    implementation, the `Reference` of its hot path: a table for
    `ExportedProgram.run_decompositions`. Backward ops are left out (nothing exports them).

    Ops of a namespace that is not loaded are left out too: a graph holding them would
    have needed them loaded.
    """
    table: dict[torch._ops.OpOverload, Callable] = {}
    for namespace in sorted(set(NAMESPACES.values())):
        ops = getattr(torch.ops, namespace)
        for hot_path in HOT_PATHS:
            for name, impl in reference_ops(hot_path).items():
                if hasattr(ops, name):
                    table[getattr(ops, name).default] = impl
    return table


def reference_ops(hot_path: str) -> dict[str, Callable]:
    """The op implementations of `hot_path`'s `Reference` class, by op name."""
    reference = hot_path_module(hot_path).Reference
    return {name: getattr(reference, name) for name in vars(reference) if not name.startswith("_")}
