"""The op layer: one module per hot path, each the single home of its ops.

`attnkernels/ops/<hot_path>.py` holds, for that hot path: the public functions (re-exported
by `attnkernels.functional`) with their argument checks, the plain-PyTorch implementation that
serves as the `reference` backend, the fake (meta) implementations and the autograd of the
registered ops. The schemas and the math of the ops are written once, in
`csrc/<hot_path>_ops.cpp`; the kernels live in `csrc/cpu/`, `csrc/cuda/` and
`attnkernels/triton/`, one file per hot path.

Op namespaces, one per compiled backend family:
* `torch.ops.attnkernels`: the C++ library (CPU and CUDA kernels behind one schema each; the
  dispatcher picks by device). Its fakes and autograd are registered when the library is
  loaded (`attnkernels._ext.load`), never as a side effect of choosing a backend.
* `torch.ops.attnkernels_triton`: the Triton kernels, registered with the same schemas (read
  from csrc/) when a module of `attnkernels.triton` is imported; its autograd then too.
Composite ops (a fixed sequence of a namespace's own ops, such as `channel_attention` where
no fused kernel exists) are written once in Python and registered into each namespace.
"""
from __future__ import annotations

import importlib

#: Every hot path, by its one name (the same in csrc/, triton/, ops/, tests/ and benchmarks/).
#: A new hot path adds its name here: the library load registers its ops from it.
HOT_PATHS = (
    "channel_gate", "ham_spatial", "nonlocal_attn", "gam_channel", "shuffle_conv", "softmax_spatial", "cbam_spatial",
    "triplet", "bam", "cam", "criss_cross", "block_tail", "spatial_tail",
)


def hot_path_module(hot_path: str):
    """The op module `attnkernels.ops.<hot_path>`."""
    if hot_path not in HOT_PATHS:
        raise ValueError(f"unknown hot path {hot_path!r}; expected one of {', '.join(HOT_PATHS)}")
    return importlib.import_module(f"{__name__}.{hot_path}")


def register(namespace: str) -> None:
    """Give every hot path's ops in `namespace` their fakes, composites and autograd; idempotent.

    Called once the namespace's kernels exist: by `attnkernels._ext` after loading the C++
    library ("attnkernels"), by each `attnkernels.triton` module on import ("attnkernels_triton",
    for its own hot path through `register_hot_path`).
    """
    for hot_path in HOT_PATHS:
        register_hot_path(hot_path, namespace)


def register_hot_path(hot_path: str, namespace: str) -> None:
    """Register one hot path's ops in `namespace` (see `register`)."""
    hot_path_module(hot_path).REGISTRATION.register(namespace)
