"""The last-level cache (LLC) of the device, and the input rotation that keeps inputs out of it.

Why: a memory-bound module is timed against a memcpy of its input, so where that input sits
decides the floor. The default CPU shape (4x512x28x28 fp32, 6.1 MiB) fits in a 32 MiB L3:
the memcpy was sometimes measured from cache and sometimes from DRAM, depending on what the
variant before it had touched, and swung 0.17-0.66 ms between the rows of one run.

The fix chosen here is *rotation*, not larger inputs. Each (module, shape) case holds K
copies of its inputs (x, any bridge maps, grad_output), with

    K = ceil(2 * LLC / bytes of one copy's x and bridge maps), at least 1, at most MAX_INPUT_SETS,

and every call of every variant (warm-up, timed rounds, peak memory) takes the next copy,
round-robin across the variants. Between two uses of one copy, other copies totalling at
least 2x the LLC have been read, so each call finds its input in DRAM, whichever variant ran
before it. Why rotation rather than scaling the batch until one input is 2x the LLC:

* the time per call stays that of the shape measured. Scaling N to 2x a 32 MiB L3 turns
  N = 4 into N = 42 and the default run (minutes already) ten times longer; server CPUs
  with 256 MiB - 1 GiB of L3 would need N in the hundreds, and the eager modules'
  temporaries (up to 6x the input) tens of GiB;
* the shapes stay the ResNet-50 stage shapes at the batch asked for, and a user's explicit
  ``--shapes`` are measured exactly as given, and cold as well (rotation applies to them too);
* the extra memory is the rotation set only: about 2 x 2x LLC (the x and grad_output
  copies; a copy's requires-grad leaf shares its x's storage), 128 MiB on a 32 MiB L3.

What rotation leaves as it was: outputs and temporaries are allocated afresh in every call,
and the allocator hands back the addresses the previous call freed, so their writes may hit
lines still in cache, as they do in a network (same allocator); and a module that reads
its input twice in one call finds it in cache the second time when it fits, as it would in
the network at that shape (the per-sample fused kernels are built on that). The cap
MAX_INPUT_SETS keeps tiny test shapes (a few KiB, where the call overhead dominates anyway)
from allocating hundreds of thousands of tensors; the JSON metadata records each case's K.

On CUDA the LLC is the L2 (``torch.cuda.get_device_properties(...).L2_cache_size``): the
CUDA timer also flushes it before each call, and the default CUDA shapes are already twice
an H100's L2, so K is 1-3 there. On CPU the size comes from Linux's sysfs
(``/sys/devices/system/cpu/cpu0/cache/index*/{level,type,size}``: the highest level that
holds data), else from ``lscpu`` (per instance), else DEFAULT_LLC_BYTES.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

MIB = 1 << 20
#: Where Linux describes cpu0's caches, one ``index<i>/`` folder per cache.
SYSFS_CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")
#: Used when the machine does not say (per device type).
DEFAULT_LLC_BYTES: Dict[str, int] = {"cpu": 32 * MIB, "cuda": 64 * MIB}
#: Inputs rotate among copies totalling at least this many times the LLC.
ROTATION_FACTOR = 2
#: The most input copies one case rotates among (tiny shapes would otherwise need 1e5).
MAX_INPUT_SETS = 1024

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class CacheInfo:
    """The last-level cache: its size, name (``"L3"``, ``"L2"``) and where that was read."""

    bytes: int
    level: str
    source: str  # "sysfs", "lscpu", "torch.cuda" or "default"

    def describe(self) -> str:
        """``"32 MiB L3 (sysfs)"``."""
        return f"{self.bytes / MIB:g} MiB {self.level} ({self.source})"

    def metadata(self) -> Dict[str, object]:
        """For the JSON document."""
        return {"bytes": self.bytes, "mib": round(self.bytes / MIB, 3), "level": self.level, "source": self.source}


def parse_size(text: str) -> Optional[int]:
    """``"32768K"``, ``"32 MiB"``, ``"1M"``, ``"512"`` -> bytes; None if it is not a size."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def read_sysfs(root: Path = SYSFS_CACHE_DIR) -> Optional[CacheInfo]:
    """The highest-level data (or unified) cache under ``root`` (``index*/level``, ``type``,
    ``size``); the largest if that level lists several. None if nothing readable is there."""
    best: Optional[tuple] = None
    for index in sorted(Path(root).glob("index*")):
        try:
            level = int((index / "level").read_text().strip())
            size = parse_size((index / "size").read_text())
            kind = (index / "type").read_text().strip() if (index / "type").exists() else "Unified"
        except (OSError, ValueError):
            continue
        if size and kind.lower() != "instruction" and (best is None or (level, size) > best):
            best = (level, size)
    return None if best is None else CacheInfo(best[1], f"L{best[0]}", "sysfs")


def lscpu_output() -> str:
    """``lscpu``'s report in the C locale ('' where there is no lscpu)."""
    try:
        done = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def parse_lscpu(text: str) -> Optional[CacheInfo]:
    """The highest ``L<n> cache:`` line of ``lscpu``'s report, per instance: newer lscpu
    prints the total with a count (``L3 cache: 64 MiB (2 instances)``), older one instance's
    size (``L3 cache: 32768K``). None if there is no such line."""
    best: Optional[tuple] = None
    for line in text.splitlines():
        match = re.match(r"\s*L(\d)[a-z]?\s+cache:\s*([\d.]+\s*[KMG]?(?:i?B)?)\s*(?:\((\d+) instances?\))?", line, re.I)
        if not match or line.lstrip().lower().startswith(("l1i",)):
            continue
        size = parse_size(match.group(2))
        if not size:
            continue
        size //= int(match.group(3) or 1)
        level = int(match.group(1))
        if best is None or (level, size) > best:
            best = (level, size)
    return None if best is None else CacheInfo(best[1], f"L{best[0]}", "lscpu")


def last_level_cache(
    device: torch.device | str = "cpu",
    sysfs_root: Optional[Path] = None,
    lscpu: Optional[Callable[[], str]] = None,
) -> CacheInfo:
    """The device's last-level cache: the GPU's L2 on CUDA; on CPU sysfs (``sysfs_root``,
    default SYSFS_CACHE_DIR), else ``lscpu`` (default: run it), else DEFAULT_LLC_BYTES
    (source ``"default"``)."""
    device = torch.device(device)
    sysfs_root = SYSFS_CACHE_DIR if sysfs_root is None else sysfs_root
    lscpu = lscpu_output if lscpu is None else lscpu
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
        if size > 0:
            return CacheInfo(int(size), "L2", "torch.cuda")
        return CacheInfo(DEFAULT_LLC_BYTES["cuda"], "L2", "default")
    found = read_sysfs(sysfs_root) or parse_lscpu(lscpu())
    return found or CacheInfo(DEFAULT_LLC_BYTES["cpu"], "LLC", "default")


def rotation_count(copy_bytes: int, llc_bytes: int) -> int:
    """How many copies of an input of ``copy_bytes`` a case rotates among: enough that they
    total ``ROTATION_FACTOR`` x ``llc_bytes`` (1 when one copy already does, ``llc_bytes``
    0 included), at most MAX_INPUT_SETS."""
    if copy_bytes <= 0:
        return 1
    return max(1, min(MAX_INPUT_SETS, math.ceil(ROTATION_FACTOR * llc_bytes / copy_bytes)))
