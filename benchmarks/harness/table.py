"""Fixed-width text tables: the module table's and the model table's cells, headers and lines.

A table is a sequence of ``(header, row field, width, format)`` columns; a row is a dataclass
whose fields include those keys (and ``error``, printed after the cells when set).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Dict, Sequence, Tuple

Table = Sequence[Tuple[str, str, int, str]]


def format_cell(value: Any, width: int, fmt: str) -> str:
    """One right-aligned cell (left-aligned for text); '-' for a missing number."""
    if fmt == "s":
        return f"{str(value):<{width}}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}{fmt}}"


def column_headers(table: Table) -> str:
    """The header cells of ``table``'s columns, aligned like their values."""
    return " ".join(format_cell(h, w, "s") if f == "s" else f"{h:>{w}}" for h, _, w, f in table)


def format_line(values: Dict[str, Any], table: Table) -> str:
    """One table line: the cells of ``table``'s columns, then the row's error if it has one."""
    line = " ".join(format_cell(values[key], w, f) for _, key, w, f in table)
    if values.get("error"):
        line += f"  ! {values['error']}"
    return line.rstrip()


def format_rows(rows: Sequence[Any], table: Table, group: Sequence[str]) -> str:
    """Table lines of ``rows``; the ``group`` fields only where they change from the line before."""
    lines = []
    for i, row in enumerate(rows):
        values = asdict(row)
        if i > 0 and all(getattr(row, k) == getattr(rows[i - 1], k) for k in group):
            values.update({k: "" for k in group})
        lines.append(format_line(values, table))
    return "\n".join(lines)
