"""Load the compiled ops of csrc/: the ahead-of-time module if installed, else a JIT build.

The JIT build runs once per source version: the library's name carries a hash of every
source, header and flag (`_build.BuildConfig.digest`), so a changed source builds anew and
an unchanged one loads from the torch extensions cache (or `ATTNKERNELS_BUILD_DIR`). torch's
builder holds a file lock in the build directory, and attnkernels its own around it (one that
a killed build cannot leave held: `_build_lock`), so two processes starting at once build it
once. While it builds, one line says so.

A library is checked before it is loaded (`attnkernels._integrity`): a damaged one, such as a
file truncated by a killed build or a partial copy, would kill the process with SIGBUS, so it
is removed and rebuilt instead. A build folder that is not writable is only read: a whole
library there loads without building or locking; otherwise nothing can be built.

If the ops cannot be had, `load()` raises `ExtensionUnavailable` saying what failed (the
underlying cause, e.g. the compiler's first error) and how to fix it; `attnkernels.backend`
turns that into one warning per process and the next backend.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import sys
import threading
from pathlib import Path

import torch

from . import _build, _build_lock, _integrity


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
    disabled = os.environ.get("ATTNKERNELS_NO_EXTENSION", "")
    if disabled not in ("", "0"):
        raise ExtensionUnavailable(
            f"the compiled ops are disabled on purpose by ATTNKERNELS_NO_EXTENSION={disabled} "
            "(unset it to use them)"
        )
    aot = importlib.util.find_spec("attnkernels._C")
    if aot is not None and aot.origin:
        damage = _integrity.problem(Path(aot.origin))
        if damage is not None:
            raise ExtensionUnavailable(
                f"attnkernels: the installed module {aot.origin} is damaged: {damage}. To fix: "
                "reinstall attnkernels (ATTNKERNELS_BUILD_EXT=1 pip install --no-build-isolation .)."
            )
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
    library = build_dir / f"{name}{cpp_extension.LIB_EXT}"
    if not os.access(build_dir, os.W_OK | os.X_OK):
        return _load_without_building(library)
    try:
        with _build_lock.holding(build_dir):
            _discard_if_damaged(library)
            if not library.is_file():
                _require_compiler()
                what = "C++ and CUDA" if config.with_cuda else "C++"
                print(f"attnkernels: building the {what} ops (first use; a few minutes) in {build_dir}",
                      file=sys.stderr, flush=True)
            cpp_extension.load(
                name=name,
                sources=config.sources,
                extra_include_paths=config.include_dirs,
                extra_cflags=config.cflags,
                extra_cuda_cflags=config.cuda_cflags,
                extra_ldflags=config.ldflags,
                with_cuda=config.with_cuda,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=os.environ.get("ATTNKERNELS_VERBOSE_BUILD", "") not in ("", "0"),
            )
    except ExtensionUnavailable:
        raise
    except Exception as err:  # the compiler's own message is the useful part
        raise ExtensionUnavailable(_explain_build_failure(err, str(build_dir))) from err
    global _cuda_compiled
    _cuda_compiled = config.with_cuda
    _register_python_side()
    _remember_checksum(library)
    return str(library)


def _build_directory(name: str) -> Path:
    """The folder that holds (or will hold) library `name`, created if missing."""
    root = os.environ.get("ATTNKERNELS_BUILD_DIR")
    try:
        if root:
            path = os.path.join(root, name)
            os.makedirs(path, exist_ok=True)
            return Path(path)
        import torch.utils.cpp_extension as cpp_extension

        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except OSError as err:
        raise ExtensionUnavailable(_not_writable(root or err.filename or name, err)) from err


def _not_writable(folder: object, err: OSError | None = None) -> str:
    why = f" ({err.strerror})" if err is not None and err.strerror else ""
    return (
        f"attnkernels: the build folder {folder} is not writable{why}, so the compiled ops cannot be "
        "built there. To fix: set ATTNKERNELS_BUILD_DIR to a writable folder (or make this one writable)."
    )


def _load_without_building(library: Path) -> str:
    """Load the library of a folder this process cannot write: no build and no lock (whose
    file could not be created); only a whole library will do."""
    if not library.is_file():
        raise ExtensionUnavailable(_not_writable(library.parent))
    damage = _integrity.problem(library)
    if damage is not None:
        raise ExtensionUnavailable(
            f"attnkernels: the compiled library {library} is damaged: {damage}; its folder is not "
            "writable, so it cannot be rebuilt. To fix: set ATTNKERNELS_BUILD_DIR to a writable "
            "folder (or delete the file)."
        )
    _register(str(library))
    return str(library)


def _discard_if_damaged(library: Path) -> None:
    """Remove a damaged library, so the build makes it anew instead of loading it.

    Called holding the build folder's lock (`_build_lock`), so a library that another process
    is still linking is never judged half-written.
    """
    if not library.is_file():
        _integrity.forget(library)  # the record of a library that is gone
        return
    damage = _integrity.problem(library)
    if damage is None:
        return
    print(f"attnkernels: {library} is damaged: {damage}; rebuilding it", file=sys.stderr, flush=True)
    library.unlink()
    _integrity.forget(library)


def _remember_checksum(library: Path) -> None:
    """Record the checksum of the library that just loaded (new or rebuilt), for later loads."""
    if _integrity.record_is_current(library):
        return
    try:
        _integrity.record(library)
    except OSError:
        pass  # an unrecorded library still gets the structural check


def _require_compiler() -> None:
    """Fail early, with the fix, when the C++ compiler that the build would call is missing."""
    import torch.utils.cpp_extension as cpp_extension

    compiler = cpp_extension.get_cxx_compiler()  # $CXX, else c++
    program = (shlex.split(compiler) or [compiler])[0]
    if shutil.which(program) is None:
        raise ExtensionUnavailable(
            f"attnkernels: building the compiled ops failed: {program}: not found on PATH (the C++ "
            f"compiler the build calls). To fix: {_INSTALL_COMPILER}."
        )


_INSTALL_COMPILER = "install a C++ compiler (g++ or clang++), or set CXX to one, and retry"
# Lines of a failed build that say why, in the order to prefer them: the compiler's first
# error, then a shell's or the OS's complaint.
_CAUSE_MARKERS = ("error:", "not found", "no such file", "permission denied", "read-only file system")
# A program the build ran that is not there: a shell's "c++: not found" or "c++: command not
# found", or Python's "No such file or directory: 'c++'" (a bare name, not a path).
_MISSING_PROGRAM = re.compile(r"([\w.+/-]+): (?:command )?not found|No such file or directory: '([^'/]+)'")


def _explain_build_failure(err: Exception, build_dir: str) -> str:
    """The one-line reason for a failed build: the underlying cause, then the fix."""
    text = str(err)
    cause = _cause(text, err)
    fix = _fix(err, cause, build_dir)
    return f"attnkernels: building the compiled ops failed: {cause.rstrip('.')}. To fix: {fix}."


def _cause(text: str, err: Exception) -> str:
    """The line of a build's output that says why it failed (not the command that ran)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in _CAUSE_MARKERS:
        found = [ln for ln in lines if marker in ln.lower() and not ln.startswith(("[", "FAILED:"))]
        if found:
            return found[0]
    return (lines or [type(err).__name__])[0]


def _fix(err: Exception, cause: str, build_dir: str) -> str:
    if "Ninja is required" in str(err):
        return "install ninja (pip install ninja)"
    missing = _MISSING_PROGRAM.search(cause)
    if missing:
        program = missing.group(1) or missing.group(2)
        if "nvcc" in program:
            return "install the CUDA toolkit and set CUDA_HOME to its root, or set ATTNKERNELS_WITH_CUDA=0"
        return "install ninja (pip install ninja)" if "ninja" in program else _INSTALL_COMPILER
    if isinstance(err, OSError):
        return "set ATTNKERNELS_BUILD_DIR to a writable folder (or make this one writable)"
    return f"see the compiler output above; set ATTNKERNELS_VERBOSE_BUILD=1 for the full log ({build_dir})"
