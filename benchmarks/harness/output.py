"""What a run writes: ``throughput.csv`` (the module rows), ``throughput_models.csv`` (the
model rows, when there are any), ``throughput.json`` (``{"meta", "rows", "model_rows"}``) and
``throughput.png`` (per module, each variant's time over memcpy's, forward and
forward+backward; matplotlib with the Agg backend, skipped with a note when it is missing)."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import model_rows
from model_rows import ModelRow

from .rows import COLUMNS, Row

#: The chart's two panels: (row field, title).
CHART_PANELS: Tuple[Tuple[str, str], ...] = (
    ("fwd_vs_memcpy", "forward (eval, inference_mode)"),
    ("fwd_bwd_vs_memcpy", "forward + backward (train)"),
)


def rounded(value: Any) -> Any:
    """Floats rounded to 6 significant digits; anything else unchanged."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def csv_record(row: Any) -> Dict[str, Any]:
    """A row (``Row`` or ``ModelRow``) for ``csv.DictWriter``: numbers rounded, missing
    numbers as empty cells."""
    return {k: "" if v is None else rounded(v) for k, v in asdict(row).items()}


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Any]) -> None:
    """Write ``rows`` (dataclass instances with ``columns`` as fields) to a CSV file."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow(csv_record(row))


def json_document(
    rows: Sequence[Row], meta: Dict[str, Any], models: Sequence[ModelRow] = ()
) -> Dict[str, Any]:
    """``{"meta": ..., "rows": [...]}`` (and ``"model_rows": [...]`` when there are model
    rows) with numbers rounded like the CSV."""
    doc: Dict[str, Any] = {"meta": meta, "rows": [{k: rounded(v) for k, v in asdict(r).items()} for r in rows]}
    if models:
        doc["model_rows"] = [{k: rounded(v) for k, v in asdict(r).items()} for r in models]
    return doc


def write_chart(rows: Sequence[Row], meta: Dict[str, Any], path: Path) -> Optional[str]:
    """Draw the module rows' time over memcpy time as grouped bars (one group per module and
    shape, one bar per variant; memcpy is the line at 1) into the PNG ``path``. None when
    written, else a one-line note saying why not (no matplotlib, nothing to draw)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install matplotlib, or make install)"
    groups = list(dict.fromkeys((r.module, r.shape) for r in rows))
    variants = list(dict.fromkeys(r.variant for r in rows if r.variant != "memcpy"))
    value = {(r.module, r.shape, r.variant): r for r in rows}
    if not groups or not variants or not any(getattr(r, f) for r in rows for f, _ in CHART_PANELS):
        return "no chart: no variant has a time relative to memcpy"
    one_shape = len({shape for _, shape in groups}) == 1
    labels = [module if one_shape else f"{module}\n{shape}" for module, shape in groups]
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(
        len(CHART_PANELS), 1, figsize=(max(8.0, 0.35 * len(groups) * len(variants) + 2.5), 8.0), squeeze=False
    )
    for ax, (field_name, title) in zip(axes[:, 0], CHART_PANELS):
        drawn: List[float] = []
        for j, variant in enumerate(variants):
            xs, ys = [], []
            for i, (module, shape) in enumerate(groups):
                row = value.get((module, shape, variant))
                y = getattr(row, field_name) if row is not None else None
                if y:
                    xs.append(i + (j - (len(variants) - 1) / 2) * width)
                    ys.append(y)
            bars = ax.bar(xs, ys, width=width, label=variant)
            if len(groups) * len(variants) <= 60:  # values on the bars while they stay legible
                ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
            drawn += ys
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="memcpy (x.clone())")
        if drawn and max(drawn) / min(drawn) > 20:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("time / memcpy time")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, ncol=min(len(names), 6), loc="upper center", bbox_to_anchor=(0.5, 0.935))
    shape_note = f" {groups[0][1]}" if one_shape else ""
    fig.suptitle(
        f"attnkernels throughput{shape_note} {meta.get('dtype', '')}, {meta.get('device', '')}\n"
        "each variant's time / memcpy time (lower is better; memcpy = 1)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.915))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_results(
    rows: Sequence[Row], meta: Dict[str, Any], out: Path, models: Sequence[ModelRow] = ()
) -> Tuple[List[Path], List[str]]:
    """Write ``throughput.csv``, ``throughput.json``, ``throughput.png`` (when there are module
    rows) and ``throughput_models.csv`` (when there are model rows) into ``out``; return the
    paths written and notes on what was not."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "throughput.csv", out / "throughput.json"
    write_csv(csv_path, COLUMNS, rows)
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(json_document(rows, meta, models), fh, indent=1)
        fh.write("\n")
    paths, notes = [csv_path, json_path], []
    if models:
        paths.append(out / "throughput_models.csv")
        write_csv(paths[-1], model_rows.MODEL_COLUMNS, models)
    chart = out / "throughput.png"
    try:
        note = write_chart(rows, meta, chart) if rows else None
    except Exception as err:  # the CSV and JSON are written; a chart must not fail the run
        note = f"no chart: {type(err).__name__}: {err}"
    if rows and note is None:
        paths.append(chart)
    else:
        notes += [note] if note else []
        chart.unlink(missing_ok=True)  # no older run's chart beside these rows
    return paths, notes
