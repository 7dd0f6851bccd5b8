"""Timers and the interleaved rounds every benchmark table is timed in.

A *phase* times a set of named steps (the variants of one case, or the model rows): after
``warmup`` untimed calls each, round r times every step once, in an order shuffled anew each
round (seeded), then round r+1 does the same, and each step's median over the rounds is
reported. Slow drifts in clock speed or memory state hit all steps alike, and no step always
follows the same one (a step pays for the memory traffic its predecessor left behind: on CPU
a fused op measured 1.5 ms right after a clone and 2.2-2.5 ms right after the eager module
that writes twice as much, when the order was fixed). Peak memory is measured once, after
the timed rounds: the profiler it runs slows the calls that follow it (memcpy 1.09 -> 1.51 ms,
a fused op 1.75 -> 2.92 ms on CPU).

Timers: ``time.perf_counter`` around each call on CPU; on CUDA, CUDA events around each
call, with the L2 flushed (a buffer twice its size zeroed) before each call.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from attnkernels.profiling import peak_memory

from .cache import last_level_cache

Step = Callable[[], Any]
Timer = Callable[[Step], float]
ERROR_CHARS = 300


class CpuTimer:
    """Wall time of one call with ``time.perf_counter``, in ms."""

    def __call__(self, step: Step) -> float:
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3


class CudaTimer:
    """GPU time of one call between two CUDA events, in ms, starting from a cold L2."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        l2_bytes = last_level_cache(device).bytes
        self.flush = torch.empty(2 * max(l2_bytes, 2**20), dtype=torch.uint8, device=device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, step: Step) -> float:
        self.flush.zero_()
        self.start.record()
        step()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end)


def make_timer(device: torch.device) -> Timer:
    """The timer for ``device``."""
    return CudaTimer(device) if device.type == "cuda" else CpuTimer()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_text(err: BaseException) -> str:
    """``Type: first line of the message``, shortened, for a table row."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


@dataclass
class PhaseResult:
    """What one phase (forward or fwd+bwd) measured for one step."""

    times_ms: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    first_call_s: float = 0.0
    error: Optional[str] = None

    @property
    def median_ms(self) -> Optional[float]:
        """Median of the timed rounds, or None if the step failed or was not timed."""
        return statistics.median(self.times_ms) if self.times_ms and self.error is None else None


def run_phase(
    steps: Dict[str, Step], timer: Timer, *, repeats: int, warmup: int, device: torch.device,
    min_time_s: float = 0.0, max_repeats: int = 0,
) -> Dict[str, PhaseResult]:
    """Warm up, time all steps round by round (each round in a new seeded order): `repeats`
    rounds, then more while the timed rounds have taken under `min_time_s` seconds, up to
    `max_repeats` rounds in all; then measure peak memory once. A step that raises is dropped
    from the rest of the phase with its error recorded."""
    results = {name: PhaseResult() for name in steps}
    live = dict(steps)

    def attempt(name: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as err:  # a failing step must not end the run
            results[name].error = error_text(err)
            live.pop(name, None)

    for name, step in list(live.items()):
        start = time.perf_counter()
        for _ in range(warmup):
            attempt(name, step)
            if name not in live:
                break
        synchronize(device)
        results[name].first_call_s = time.perf_counter() - start
    order = random.Random(0)
    start, rounds = time.perf_counter(), 0
    while live and (rounds < repeats or (rounds < max_repeats and time.perf_counter() - start < min_time_s)):
        rounds += 1
        names = list(live)
        order.shuffle(names)
        for name in names:
            if name in live:
                step = live[name]
                attempt(name, lambda: results[name].times_ms.append(timer(step)))
    for name, step in list(live.items()):
        attempt(name, lambda: setattr(results[name], "peak_bytes", peak_memory(step, device)))
    return results
