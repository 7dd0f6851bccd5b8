"""Measurement helpers shared by the benchmarks: peak memory and a quiet, stable CPU allocator.

``peak_memory(fn, device)``
    Bytes of memory allocated at the high-water mark *during* ``fn()``, above what was
    allocated when it started. Tensors that ``fn`` returns count (they were allocated
    during the call); memory that ``fn`` frees before its peak does not.

    * CUDA: the caching allocator's own statistics
      (``torch.cuda.reset_peak_memory_stats`` + ``max_memory_allocated`` minus the
      ``memory_allocated`` at the start).
    * CPU: PyTorch keeps no CPU high-water mark, so ``fn`` runs once under
      ``torch.profiler.profile(profile_memory=True)``; every allocation and free
      (a negative size) the profiler recorded is replayed in time order and the
      largest running total is the peak. This walks the profiler's event tree, a
      private API (``prof.profiler.kineto_results.experimental_event_tree()``);
      if the installed torch lacks it a ``RuntimeError`` says so.

``BENCHMARK_MALLOC_ENV`` / ``benchmark_env_ready()`` / ``ensure_benchmark_env()``
    glibc returns freed large buffers to the OS, so each call of a memory-bound op
    page-faults its output back in and CPU timings swing (two identical modules were
    measured 1.4x apart). Raising glibc's mmap and trim thresholds keeps those buffers in
    the process. glibc reads these variables only at process start, so a benchmark that
    finds them unset sets them and re-executes itself (``ensure_benchmark_env``).
"""
from __future__ import annotations

import os
import sys
from itertools import accumulate
from typing import Any, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence, Tuple

import torch

__all__ = [
    "BENCHMARK_MALLOC_ENV",
    "benchmark_env_ready",
    "ensure_benchmark_env",
    "peak_memory",
]

#: glibc malloc settings for stable CPU timings: allocations up to 32 MiB come from the heap
#: (not a fresh mmap each call) and up to 1 GiB of freed heap is kept instead of trimmed.
BENCHMARK_MALLOC_ENV: Mapping[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
}

# Kineto (the profiler backend) prints start/stop lines and, on a CUDA build without a GPU,
# an error about the device count to stderr. It reads its log level once, when the first
# profiler session starts; 6 silences it. A level the user has set is left alone.
_KINETO_LOG_LEVEL_VAR = "KINETO_LOG_LEVEL"
_KINETO_QUIET_LEVEL = "6"


def benchmark_env_ready(environ: Mapping[str, str] | None = None) -> bool:
    """True if every variable of :data:`BENCHMARK_MALLOC_ENV` is set in ``environ``.

    Any value counts as set: a user who chose their own thresholds keeps them.
    ``environ`` defaults to ``os.environ``. Always true off Linux, where the settings
    mean nothing.
    """
    if not sys.platform.startswith("linux"):
        return True
    env = os.environ if environ is None else environ
    return all(name in env for name in BENCHMARK_MALLOC_ENV)


def _print_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ensure_benchmark_env(
    argv: Sequence[str] | None = None,
    announce: Callable[[str], Any] | None = _print_stderr,
) -> None:
    """Make sure the process runs with :data:`BENCHMARK_MALLOC_ENV`; re-execute it if not.

    If the variables are all set this returns at once. Otherwise the missing ones are put
    into ``os.environ``, one line is announced, and the interpreter is replaced
    (``os.execv``) by a fresh one running ``argv`` (default: the original command line,
    ``sys.orig_argv`` where available, so ``-m`` and ``-X`` options survive). The line goes
    to ``announce`` (default: stderr, so a script's stdout stays clean). The new
    process finds the variables set, so it does not re-execute again. Call this first
    thing in a script's ``__main__`` block, never from library code or a test.
    """
    if benchmark_env_ready():
        return
    missing = {k: v for k, v in BENCHMARK_MALLOC_ENV.items() if k not in os.environ}
    os.environ.update(missing)
    if argv is None:
        orig = getattr(sys, "orig_argv", None)
        argv = list(orig[1:]) if orig else list(sys.argv)
    if announce is not None:
        settings = " ".join(f"{k}={v}" for k, v in missing.items())
        announce(f"re-executing with {settings} (glibc reads them at start; stable CPU timings)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Bytes of peak memory allocated on ``device`` during ``fn()``, above the starting level.

    The result includes whatever ``fn`` returns (it is dropped before this returns) and
    is never negative. Run ``fn`` once beforehand if it has one-off costs (lazy
    initialisation, compilation) that should not count, and free what a previous call
    left behind (e.g. ``.grad`` tensors) so that ``fn`` does not start by freeing it.

    Args:
        fn: the work to measure, called exactly once with no arguments.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (a ``torch.device`` too).

    Raises:
        RuntimeError: on CPU, if this torch's profiler does not expose the event tree
            used to replay allocations; for a device type other than CPU and CUDA.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return _peak_memory_cuda(fn, dev)
    if dev.type == "cpu":
        return _peak_memory_cpu(fn)
    raise RuntimeError(f"peak_memory supports cpu and cuda devices, not {dev.type!r}")


def _peak_memory_cuda(fn: Callable[[], Any], dev: torch.device) -> int:
    """Peak bytes during ``fn()`` from the CUDA caching allocator's statistics."""
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(dev)
    start = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    result = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del result
    return max(0, peak - start)


def _peak_memory_cpu(fn: Callable[[], Any]) -> int:
    """Peak bytes during ``fn()`` on CPU, replaying the profiler's allocation events."""
    allocation_tag = _allocation_event_tag()
    from torch.profiler import ProfilerActivity, profile

    with _quiet_kineto():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        del result
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError as err:
        raise RuntimeError(_PRIVATE_API_MESSAGE) from err
    deltas = _cpu_allocation_deltas(roots, allocation_tag)
    return _peak_of(deltas)


_PRIVATE_API_MESSAGE = (
    "attnkernels.profiling.peak_memory on CPU needs torch's private profiler event tree "
    "(prof.profiler.kineto_results.experimental_event_tree() and "
    "torch._C._profiler._EventType.Allocation), which this torch "
    f"({torch.__version__}) does not provide; measure on CUDA or use a torch version that has it."
)


def _allocation_event_tag() -> Any:
    """The profiler's ``_EventType.Allocation`` enum value, or a clear ``RuntimeError``."""
    try:
        return torch._C._profiler._EventType.Allocation
    except AttributeError as err:
        raise RuntimeError(_PRIVATE_API_MESSAGE) from err


def _walk(events: Iterable[Any]) -> Iterator[Any]:
    """Every event of a profiler event tree, depth first (iterative: trees can be deep)."""
    stack = list(events)
    while stack:
        event = stack.pop()
        yield event
        stack.extend(event.children)


def _cpu_allocation_deltas(roots: Iterable[Any], allocation_tag: Any) -> list[Tuple[int, int]]:
    """``(time_ns, bytes)`` for each CPU allocation (positive) and free (negative), sorted."""
    deltas = []
    for event in _walk(roots):
        if event.tag != allocation_tag:
            continue
        fields = event.extra_fields
        device = getattr(fields, "device", None)
        if device is not None and torch.device(device).type != "cpu":
            continue
        deltas.append((int(event.start_time_ns), int(fields.alloc_size)))
    deltas.sort(key=lambda d: d[0])
    return deltas


def _peak_of(deltas: Iterable[Tuple[int, int]]) -> int:
    """Largest running total of the sizes in ``deltas`` (already in time order), at least 0."""
    return max(0, max(accumulate(size for _, size in deltas), default=0))


class _quiet_kineto:
    """Context manager: ``KINETO_LOG_LEVEL`` silenced for the profiler session it wraps.

    Kineto reads the level when its first session in the process starts, so this quiets
    that session and every later one; a level already in the environment is respected.
    """

    def __enter__(self) -> "_quiet_kineto":
        self._env: MutableMapping[str, str] = os.environ
        self._was_set = _KINETO_LOG_LEVEL_VAR in self._env
        if not self._was_set:
            self._env[_KINETO_LOG_LEVEL_VAR] = _KINETO_QUIET_LEVEL
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._was_set:
            self._env.pop(_KINETO_LOG_LEVEL_VAR, None)
