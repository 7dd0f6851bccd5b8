"""Load the compiled ops of csrc/: the ahead-of-time module if installed, else a JIT build.

The JIT build runs once per source version: the library's name carries a hash of every
source, header and flag (`_build.BuildConfig.digest`), so a changed source builds anew and
an unchanged one loads from the torch extensions cache. torch's builder holds a file lock in
the build directory, so two processes starting at once build it once. While it builds, one
line says so. If it cannot be built, `load()` raises `ExtensionUnavailable` saying what
failed and how to fix it; `attnkernels.backend` turns that into one warning and the next
backend.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

import torch

from . import _build


class ExtensionUnavailable(RuntimeError):
    """The compiled ops could not be built or loaded; the message says why and what to do."""


_lock = threading.Lock()
_loaded_from: str | None = None
_error: ExtensionUnavailable | None = None
_cuda_compiled = False


def load() -> str:
    """Load the compiled ops once per process; return where they came from.

    Raises ExtensionUnavailable (the same one on every later call) if they cannot be had.
    `ATTNKERNELS_NO_EXTENSION=1` skips them on purpose.
    """
    global _loaded_from, _error
    with _lock:
        if _loaded_from is not None:
            return _loaded_from
        if _error is not None:
            raise _error
        try:
            _loaded_from = _load()
        except ExtensionUnavailable as err:
            _error = err
            raise
        return _loaded_from


def is_loaded() -> bool:
    """True once the compiled ops are registered in this process."""
    return _loaded_from is not None


def cuda_compiled() -> bool:
    """True if the loaded library contains the CUDA kernels."""
    return _cuda_compiled


def _load() -> str:
    if os.environ.get("ATTNKERNELS_NO_EXTENSION", "") not in ("", "0"):
        raise ExtensionUnavailable("the compiled ops are disabled by ATTNKERNELS_NO_EXTENSION")
    aot = importlib.util.find_spec("attnkernels._C")
    if aot is not None and aot.origin:
        _register(aot.origin)
        return aot.origin
    return _jit_build()


def _register(path: str) -> None:
    global _cuda_compiled
    torch.ops.load_library(path)
    _cuda_compiled = torch._C._dispatch_has_kernel_for_dispatch_key("attnkernels::channel_pool", "CUDA")
    _register_python_side()


def _register_python_side() -> None:
    """What the extension-cpp pattern does once the library is loaded: every op's fake
    implementation, autograd and Python composites (attnkernels.ops)."""
    from . import ops

    ops.register("attnkernels")


def _jit_build() -> str:
    import torch.utils.cpp_extension as cpp_extension

    try:
        config = _build.build_config()
    except FileNotFoundError as err:
        raise ExtensionUnavailable(str(err)) from err
    _build.prepare_cuda_toolchain(config)
    name = f"attnkernels_ext_{config.digest()}"
    build_dir = _build_directory(name)
    library = Path(build_dir) / f"{name}.so"
    if not library.is_file():
        what = "C++ and CUDA" if config.with_cuda else "C++"
        print(
            f"attnkernels: building the {what} ops (first use; a few minutes) in {build_dir}",
            file=sys.stderr,
            flush=True,
        )
    try:
        cpp_extension.load(
            name=name,
            sources=config.sources,
            extra_include_paths=config.include_dirs,
            extra_cflags=config.cflags,
            extra_cuda_cflags=config.cuda_cflags,
            extra_ldflags=config.ldflags,
            with_cuda=config.with_cuda,
            build_directory=build_dir,
            is_python_module=False,
            verbose=os.environ.get("ATTNKERNELS_VERBOSE_BUILD", "") not in ("", "0"),
        )
    except Exception as err:  # the compiler's own message is the useful part
        raise ExtensionUnavailable(_explain_build_failure(err, build_dir)) from err
    global _cuda_compiled
    _cuda_compiled = config.with_cuda
    _register_python_side()
    return str(library)


def _build_directory(name: str) -> str:
    root = os.environ.get("ATTNKERNELS_BUILD_DIR")
    if root:
        path = os.path.join(root, name)
        os.makedirs(path, exist_ok=True)
        return path
    import torch.utils.cpp_extension as cpp_extension

    return cpp_extension._get_build_directory(name, verbose=False)


def _explain_build_failure(err: Exception, build_dir: str) -> str:
    text = str(err)
    if "Ninja is required" in text:
        fix = "install ninja (pip install ninja)"
    elif "No such file or directory: 'c++'" in text or "command not found" in text:
        fix = "install a C++ compiler (g++ or clang++) and retry"
    else:
        fix = f"see the compiler output above; set ATTNKERNELS_VERBOSE_BUILD=1 for the full log ({build_dir})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # The compiler's first error says more than the command line that ran it.
    errors = [ln for ln in lines if "error:" in ln.lower()]
    reason = (errors or lines or [type(err).__name__])[0]
    return f"attnkernels: building the compiled ops failed: {reason} To fix: {fix}."
