"""One run's settings (:class:`Config`), the per-device defaults, and shape/dtype text."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch

from .cache import CacheInfo

if TYPE_CHECKING:
    from model_rows import ModelSettings

Shape = Tuple[int, int, int, int]

# Default shapes: ResNet-50 stage outputs (C x H x W) at a batch that fits the time budget.
# CPU: compiling is most of a default run (~4 s of C++ builds per module, shape and graph;
# 3 graphs each), so one shape: stage 2 at N = 4 (6.1 MiB in fp32). It fits in a typical
# L3, so every case rotates among copies of its inputs totalling 2x the last-level cache
# (harness/cache.py says why rotation and not a larger N). Pass --shapes for more: with a
# warm cache (a second run) each extra shape costs ~15-30 s.
# CUDA: stages 1 and 3 with the batch scaled so each input is 102.8 MB in fp32, twice an
# H100's 50 MB L2 (which is also flushed before each timed call); two shapes, not four,
# to keep compile time (a Triton build per kernel) within a few minutes.
DEFAULT_SHAPES: Dict[str, str] = {
    "cpu": "4x512x28x28",
    "cuda": "32x256x56x56,128x1024x14x14",
}
# CPU: 21 rounds. With 7, one module's median moved by 10-20% between runs on a 2-vCPU VM
# (benchmarks/NOTES.md, session 20), more than the differences the table is read for; the
# three times as many rounds add about 40 s to the default CPU table.
DEFAULT_REPEATS: Dict[str, int] = {"cpu": 21, "cuda": 50}
# After those rounds, a phase goes on round by round while it has run for less than this many
# seconds, up to MAX_ROUNDS_FACTOR times the rounds asked for: a cheap case (a 1 ms forward)
# then gets about 200 rounds where 21 left identical variants 5-10 % apart on the 2-vCPU VM,
# and a row at parity could read 0.91 (benchmarks/NOTES.md, session 31); a costly one is
# not slowed. An explicit --repeats without --min-time runs exactly that many rounds.
DEFAULT_MIN_TIME_S: Dict[str, float] = {"cpu": 1.0, "cuda": 0.5}
MAX_ROUNDS_FACTOR = 10
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
MIB = 1024.0 * 1024.0


@dataclass
class Config:
    """One run's settings, resolved from the command line (``throughput.resolve_config``)."""

    modules: List[str]
    shapes: List[Shape]
    dtype: torch.dtype
    device: torch.device
    variants: List[str]
    repeats: int
    warmup: int
    out: Optional[Path]
    json_stdout: bool
    models: Optional[ModelSettings] = None  # the whole-model rows; None: none
    cache: Optional[CacheInfo] = None  # the last-level cache inputs are rotated past; None: no rotation
    min_time_s: float = 0.0  # a phase's rounds go on past `repeats` while it has run less (DEFAULT_MIN_TIME_S)

    @property
    def max_repeats(self) -> int:
        """The most rounds a phase runs when `min_time_s` extends it."""
        return self.repeats * MAX_ROUNDS_FACTOR


def parse_shape(text: str) -> Shape:
    """``"32x256x56x56"`` -> ``(32, 256, 56, 56)``; a clear ``ValueError`` otherwise."""
    parts = text.strip().lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"shape {text!r} is not N x C x H x W with positive sizes, e.g. 8x256x56x56")
    return dims  # type: ignore[return-value]


def shape_str(shape: Sequence[int]) -> str:
    """``(32, 256, 56, 56)`` -> ``"32x256x56x56"``."""
    return "x".join(str(d) for d in shape)


def split_list(text: str) -> List[str]:
    """Comma-separated list -> stripped, non-empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")
