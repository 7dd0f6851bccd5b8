"""What a reader needs to reproduce or compare a run: the device, its last-level cache, the
load on the CPU, versions and settings (the JSON document's ``"meta"``)."""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Dict, Optional, Tuple

import torch

from attnkernels.profiling import BENCHMARK_MALLOC_ENV

import model_rows

from .cache import MAX_INPUT_SETS, ROTATION_FACTOR
from .config import Config, dtype_name, shape_str


def device_description(device: torch.device) -> str:
    """``cpu (model name)`` or ``cuda:0 (GPU name)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({model})" if model else "cpu"


def busy_cores(interval_s: float = 0.3) -> Optional[float]:
    """Cores kept busy by other processes over ``interval_s`` (this one sleeps), from /proc/stat.

    None where /proc/stat is unavailable (not Linux).
    """

    def sample() -> Tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle  # user..steal; guest time is already in user

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    busy = 1.0 - (idle1 - idle0) / (total1 - total0)
    return round(busy * (os.cpu_count() or 1), 2)


def run_metadata(cfg: Config) -> Dict[str, Any]:
    """The JSON document's ``"meta"``: device, cache, versions, settings. The runner adds
    ``input_sets`` (each case's number of input copies) and ``wall_s``."""
    cache = None
    if cfg.cache is not None:
        cache = {**cfg.cache.metadata(), "rotation_factor": ROTATION_FACTOR, "max_input_sets": MAX_INPUT_SETS}
    return {
        "device": device_description(cfg.device),
        "dtype": dtype_name(cfg.dtype),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "repeats": cfg.repeats,
        "min_time_s": cfg.min_time_s,
        "max_repeats": cfg.max_repeats,
        "warmup": cfg.warmup,
        "variants": cfg.variants,
        "modules": cfg.modules,
        "shapes": [shape_str(s) for s in cfg.shapes],
        "last_level_cache": cache,
        "input_sets": {},
        "malloc_env": {k: os.environ.get(k) for k in BENCHMARK_MALLOC_ENV},
        "busy_cores_at_start": busy_cores() if cfg.device.type == "cpu" else None,
        "forward_mode": "eval() under torch.inference_mode()",
        "fwd_bwd_mode": "train(), y.backward(g) with a fixed random g, grads set to None after each step",
        "timer": (
            "CUDA events, L2 flushed before each call" if cfg.device.type == "cuda" else "time.perf_counter"
        ),
        "models": None if cfg.models is None else model_rows.settings_metadata(cfg.models),
    }
