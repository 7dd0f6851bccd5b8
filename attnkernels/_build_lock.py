"""The build folder's lock: one process at a time checks, builds or loads the library there.

torch's builder locks the folder too, but how depends on its version. torch 2.14 holds an
OS-level lock (filelock) on the file `lock`, which the kernel releases when its holder dies.
torch 2.11 and older use a FileBaton: they create `lock`, build, and delete it; a build killed
midway leaves the file behind, and every later load waits for it forever.

So attnkernels holds its own OS-level lock, on `attnkernels.lock`, around torch's. Whoever
holds it knows that no attnkernels process is inside torch's builder for this folder, so a
FileBaton `lock` found then was left by a killed build, and is removed.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "attnkernels.lock"
TORCH_LOCK_NAME = "lock"  # what torch's builder locks the folder with, whatever its kind


def torch_uses_file_baton() -> bool:
    """True where torch's builder locks with a FileBaton (a file whose existence blocks)."""
    import torch.utils.cpp_extension as cpp_extension

    return hasattr(cpp_extension, "FileBaton")


@contextlib.contextmanager
def holding(folder: Path) -> Iterator[None]:
    """Hold the folder's lock (waiting for another process's build to finish), clearing a
    FileBaton lock that a killed build left behind."""
    from filelock import FileLock  # torch's dependency; flock-based, released when the holder dies

    with FileLock(str(folder / LOCK_NAME)):
        if torch_uses_file_baton():
            remove_stale_baton(folder)
        yield


def remove_stale_baton(folder: Path) -> bool:
    """Remove torch's FileBaton `lock` in `folder`, if there; call only while `holding` it.
    True if there was one."""
    stale = folder / TORCH_LOCK_NAME
    try:
        stale.unlink()
    except FileNotFoundError:
        return False
    print(f"attnkernels: removed {stale}, left by a build that was killed (no build holds the folder)",
          file=sys.stderr, flush=True)
    return True
