"""The module table's rows (:class:`Row`, the CSV columns), the numbers derived from a case's
two phases, and the printed table.

Per variant: forward and fwd+bwd time (ms, median); each over the memcpy variant's time for
the same phase; GB/s (``2 * x.nbytes / forward time``: read x, write y); peak memory in MiB
of one forward and one fwd+bwd step above what was allocated before it (outputs and
gradients included); speed-up against eager and against compile (their time / the
variant's); the PAM/CSM attention's TFLOP/s; ``first_call_s``, the warm-up calls of both
phases (for ``compile`` its compile time).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from model_rows import MODEL_TABLE, ModelRow

from .config import MIB, Shape, dtype_name, shape_str
from .table import column_headers, format_rows
from .timing import PhaseResult


@dataclass
class Row:
    """One (module, shape, variant) result; the fields are the CSV columns, in order."""

    module: str
    shape: str
    dtype: str
    device: str
    variant: str
    fwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    fwd_vs_memcpy: Optional[float] = None
    fwd_bwd_vs_memcpy: Optional[float] = None
    gbps: Optional[float] = None
    peak_fwd_mb: Optional[float] = None
    peak_fwd_bwd_mb: Optional[float] = None
    fwd_speedup: Optional[float] = None
    fwd_bwd_speedup: Optional[float] = None
    fwd_vs_compile: Optional[float] = None
    fwd_bwd_vs_compile: Optional[float] = None
    tflops_fwd: Optional[float] = None
    tflops_fwd_bwd: Optional[float] = None
    first_call_s: Optional[float] = None
    error: str = ""


#: CSV columns, in order.
COLUMNS: Tuple[str, ...] = tuple(f.name for f in fields(Row))


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """``num / den``, or None when either is missing or den is zero."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def tflops(flops: Optional[int], ms: Optional[float]) -> Optional[float]:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds (None when either is missing)."""
    return ratio(None if flops is None else flops / 1e12, None if ms is None else ms / 1e3)


def mb(nbytes: Optional[int]) -> Optional[float]:
    """Bytes -> MiB (the ``_mb`` columns are MiB, 2**20 bytes); None passes through."""
    return None if nbytes is None else nbytes / MIB


def row_key(name: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> Dict[str, str]:
    """The identifying fields every row of one case shares."""
    return dict(module=name, shape=shape_str(shape), dtype=dtype_name(dtype), device=str(device))


def make_rows(
    base: Dict[str, str],
    x_bytes: int,
    fwd: Dict[str, PhaseResult],
    bwd: Dict[str, PhaseResult],
    flops: Tuple[Optional[int], Optional[int]] = (None, None),
) -> List[Row]:
    """Rows for one case (``base``: :func:`row_key`) from its two phases, in ``fwd``'s order,
    with ratios to memcpy, eager and compile filled in, and the attention's TFLOP/s when
    ``flops`` (forward, forward+backward) are given."""

    def median(phase: Dict[str, PhaseResult], variant: str) -> Optional[float]:
        return phase[variant].median_ms if variant in phase else None

    memcpy_f, memcpy_b = median(fwd, "memcpy"), median(bwd, "memcpy")
    eager_f, eager_b = median(fwd, "eager"), median(bwd, "eager")
    compile_f, compile_b = median(fwd, "compile"), median(bwd, "compile")
    rows = []
    for variant in fwd:
        f, b = fwd[variant], bwd[variant]
        errors = [f"fwd: {f.error}" if f.error else "", f"fwd_bwd: {b.error}" if b.error else ""]
        rows.append(
            Row(
                **base,
                variant=variant,
                fwd_ms=f.median_ms,
                fwd_bwd_ms=b.median_ms,
                fwd_vs_memcpy=ratio(f.median_ms, memcpy_f),
                fwd_bwd_vs_memcpy=ratio(b.median_ms, memcpy_b),
                gbps=ratio(2 * x_bytes / 1e9, None if f.median_ms is None else f.median_ms / 1e3),
                peak_fwd_mb=mb(f.peak_bytes) if f.error is None else None,
                peak_fwd_bwd_mb=mb(b.peak_bytes) if b.error is None else None,
                fwd_speedup=ratio(eager_f, f.median_ms),
                fwd_bwd_speedup=ratio(eager_b, b.median_ms),
                fwd_vs_compile=ratio(compile_f, f.median_ms),
                fwd_bwd_vs_compile=ratio(compile_b, b.median_ms),
                tflops_fwd=tflops(flops[0], f.median_ms) if variant != "memcpy" else None,
                tflops_fwd_bwd=tflops(flops[1], b.median_ms) if variant != "memcpy" else None,
                first_call_s=f.first_call_s + b.first_call_s,
                error="; ".join(e for e in errors if e),
            )
        )
    return rows


def failed_rows(base: Dict[str, str], variants: Sequence[str], error: str) -> List[Row]:
    """Rows for a case whose module could not be built: one per variant but memcpy."""
    return [Row(**base, variant=v, error=error) for v in variants if v != "memcpy"]


# --------------------------------------------------------------------------- printed table

# (header, row field, width, format) of the printed table; dtype and device are in the header line.
TABLE: Tuple[Tuple[str, str, int, str], ...] = (
    ("module", "module", 15, "s"),
    ("shape", "shape", 14, "s"),
    ("variant", "variant", 8, "s"),
    ("fwd ms", "fwd_ms", 9, ".3f"),
    ("f+b ms", "fwd_bwd_ms", 9, ".3f"),
    ("fwd/cpy", "fwd_vs_memcpy", 8, ".2f"),
    ("f+b/cpy", "fwd_bwd_vs_memcpy", 8, ".2f"),
    ("GB/s", "gbps", 7, ".1f"),
    ("pk fwd MB", "peak_fwd_mb", 10, ".1f"),
    ("pk f+b MB", "peak_fwd_bwd_mb", 10, ".1f"),
    ("spd fwd", "fwd_speedup", 8, ".2f"),
    ("spd f+b", "fwd_bwd_speedup", 8, ".2f"),
    ("vs cmp", "fwd_vs_compile", 7, ".2f"),
    ("vs cmp f+b", "fwd_bwd_vs_compile", 11, ".2f"),
    ("TF/s fwd", "tflops_fwd", 9, ".2f"),
    ("TF/s f+b", "tflops_fwd_bwd", 9, ".2f"),
)


def title_line(meta: Dict[str, Any]) -> str:
    """What every table of a run shares: device, torch version, threads."""
    return f"attnkernels throughput | device {meta['device']} | torch {meta['torch']} | threads {meta['threads']}"


def rounds_text(meta: Dict[str, Any]) -> str:
    """How many rounds each phase ran: "21", or "21 to 210 (more while a phase is under 1 s)"."""
    repeats, min_time = meta["repeats"], meta.get("min_time_s") or 0
    if not min_time or meta.get("max_repeats", 0) <= repeats:
        return str(repeats)
    return f"{repeats} to {meta['max_repeats']} (more while a phase is under {min_time:g} s)"


def table_header(meta: Dict[str, Any]) -> str:
    """Title lines and column headers of the printed module table."""
    title = f"{title_line(meta)} | dtype {meta['dtype']} | median of {rounds_text(meta)} interleaved rounds"
    cache = meta.get("last_level_cache")
    if cache:
        title += (
            f"\nlast-level cache {cache['mib']:g} MiB {cache['level']} ({cache['source']}): each case's inputs "
            f"rotate among copies totalling >= {cache['rotation_factor']}x that, so every call reads x from memory"
        )
    modes = f"fwd: {meta['forward_mode']}; f+b: {meta['fwd_bwd_mode']}"
    legend = (
        "cpy: memcpy (x.clone()) time; GB/s: 2*x.nbytes / fwd time; pk: peak memory above the "
        "start, outputs and grads included; spd: eager time / variant time; vs cmp: compile time / variant time; "
        "TF/s: PAM/CSM attention FLOPs (no recompute) / time; sdpa: the projections + scaled_dot_product_attention"
    )
    cols = column_headers(TABLE)
    return "\n".join([title, modes, legend, cols, "-" * len(cols)])


def format_group(rows: Sequence[Row]) -> str:
    """Table lines of one (module, shape) group; module and shape only on its first line."""
    return format_rows(rows, TABLE, ("module", "shape"))


def format_model_rows(rows: Sequence[ModelRow]) -> str:
    """Table lines of the model rows; each attention name only on its first line."""
    return format_rows(rows, MODEL_TABLE, ("attention",))
