"""Running the tables: each (module, shape) case in its two phases, the model rows, and one
progress line per case on stderr (a cold run takes minutes: the compiled ops build on first
use, torch.compile builds C++ or Triton kernels per module).

A case: build the reference module and its inputs (rotated, ``harness/cache.py``), build each
variant that runs for it (``variants.case_variants``), then the forward phase (module in
``eval()``, under ``torch.inference_mode()``) and the fwd+bwd phase (``train()``), each timed
in interleaved rounds (``timing.run_phase``). A module or variant that fails (a compile
error, an unsupported dtype) gets a row with the error text; the run goes on.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Set, Tuple

import torch

import attention_baselines
import model_rows
from model_rows import ModelRow

from .config import Config, Shape, shape_str
from .rows import Row, failed_rows, format_group, format_model_rows, make_rows, row_key, table_header, title_line
from .timing import PhaseResult, Timer, error_text, run_phase
from .variants import (
    bridge_channels_of,
    build_module,
    build_variant,
    case_variants,
    forward_step,
    make_inputs,
    training_step,
)


class Progress:
    """``[i/n] what: doing...`` when a case starts and ``[i/n] what: done in 12.3 s (...)``
    when it ends, on stderr (stdout may carry the table or the JSON document); notes once each."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.label = ""
        self.started = 0.0
        self._noted: Set[str] = set()

    @staticmethod
    def emit(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def start(self, label: str, doing: str) -> None:
        self.index += 1
        self.label = label
        self.started = time.perf_counter()
        self.emit(f"[{self.index}/{self.total}] {label}: {doing}...")

    def done(self, detail: str = "") -> None:
        seconds = time.perf_counter() - self.started
        detail = f" ({detail})" if detail else ""
        self.emit(f"[{self.index}/{self.total}] {self.label}: done in {seconds:.1f} s{detail}")

    def note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.emit(f"note: {text}")


def reset_compiler() -> None:
    """Drop torch.compile's in-memory caches (the on-disk inductor cache stays)."""
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and hasattr(dynamo, "reset"):
        dynamo.reset()


def quiet_noise() -> None:
    """Silence one-line warnings that say nothing about the benchmark itself."""
    # Inductor's C++ build on a CUDA build of torch without a GPU warns about CUDA_HOME.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


@dataclass
class CaseResult:
    """One case's rows and the number of input copies it rotated among (0: none built)."""

    rows: List[Row]
    input_sets: int


def run_case(
    name: str, shape: Shape, cfg: Config, timer: Timer, note: Callable[[str], None] = lambda text: None
) -> CaseResult:
    """Measure every variant of one (module, shape): forward phase, then fwd+bwd phase.
    ``note`` hears why a requested fused backend gets no row for this module."""
    torch.manual_seed(0)
    base = row_key(name, shape, cfg.dtype, cfg.device)
    variants, skipped = case_variants(name, cfg.variants, cfg.device)
    for variant, why in skipped.items():
        note(f"no {variant} row for {name}: {why}")
    if "compile" in variants:
        reset_compiler()  # one module's graphs never count against another's recompile limit
    try:
        module = build_module(name, shape[1], cfg.dtype, cfg.device)
        cache_bytes = cfg.cache.bytes if cfg.cache is not None else 0
        inputs = make_inputs(shape, bridge_channels_of(module), cfg.dtype, cfg.device, cache_bytes)
    except Exception as err:
        return CaseResult(failed_rows(base, variants, error_text(err)), 0)
    fns: Dict[str, Callable[..., torch.Tensor]] = {}
    build_errors: Dict[str, str] = {}
    for variant in variants:
        try:
            fns[variant] = build_variant(variant, module)
        except Exception as err:
            build_errors[variant] = error_text(err)
    params = [p for p in module.parameters() if p.requires_grad]
    phase = dict(repeats=cfg.repeats, warmup=cfg.warmup, device=cfg.device, min_time_s=cfg.min_time_s,
                 max_repeats=cfg.max_repeats)
    module.eval()
    fwd = run_phase({v: forward_step(f, inputs) for v, f in fns.items()}, timer, **phase)
    module.train()
    bwd = run_phase({v: training_step(f, inputs, params) for v, f in fns.items()}, timer, **phase)
    for variant, text in build_errors.items():
        fwd[variant] = bwd[variant] = PhaseResult(error=text)
    fwd = {v: fwd[v] for v in variants if v in fwd}  # table order
    flops = tuple(attention_baselines.attention_flops(module, shape, backward) for backward in (False, True))
    return CaseResult(make_rows(base, inputs.x.nbytes, fwd, bwd, flops), inputs.count)


def run_models(cfg: Config, timer: Timer) -> List[ModelRow]:
    """Time the training step of every model variant (``benchmarks/model_rows.py``) in one
    phase, interleaved round by round like a module's variants, bare resnet50 included."""
    settings = cfg.models
    assert settings is not None
    if "compile" in settings.variants:
        reset_compiler()
    build_errors: Dict[str, str] = {}
    steps = model_rows.build_steps(settings, lambda key, err: build_errors.__setitem__(key, error_text(err)))
    results = run_phase(steps, timer, repeats=settings.repeats, warmup=cfg.warmup, device=cfg.device)
    results.update({key: PhaseResult(error=text) for key, text in build_errors.items()})
    return model_rows.make_rows(results, settings)


def run_tables(
    cfg: Config, meta: Dict[str, object], timer: Timer, say: Callable[[str], None]
) -> Tuple[List[Row], List[ModelRow]]:
    """Run the module table and then the model rows, printing each through ``say`` as it
    is measured and one progress line per case to stderr; record each case's input copies
    in ``meta["input_sets"]``."""
    progress = Progress(len(cfg.modules) * len(cfg.shapes) + (cfg.models is not None))
    doing = "compiling and timing" if "compile" in cfg.variants else "timing"
    rows: List[Row] = []
    if cfg.modules:
        say(table_header(meta))
    for name in cfg.modules:
        for shape in cfg.shapes:
            label = f"{name} {shape_str(shape)}"
            progress.start(label, doing)
            case = run_case(name, shape, cfg, timer, progress.note)
            meta["input_sets"][label] = case.input_sets  # type: ignore[index]
            failed = sum(1 for r in case.rows if r.error)
            rotated = f"; inputs rotated among {case.input_sets} copies" if case.input_sets else ""
            progress.done(f"{len(case.rows)} rows{f', {failed} with errors' if failed else ''}{rotated}")
            rows.extend(case.rows)
            say(format_group(case.rows))
    models: List[ModelRow] = []
    if cfg.models is not None:
        say("" if cfg.modules else title_line(meta))
        say(model_rows.table_header(cfg.models))
        attentions = ", ".join([model_rows.BARE, *cfg.models.attentions])
        progress.start(f"{model_rows.MODEL} with attention {attentions}", "building and timing training steps")
        models = run_models(cfg, timer)
        progress.done(f"{len(models)} rows")
        say(format_model_rows(models))
    return rows, models


def summary_line(rows: Sequence[Row], models: Sequence[ModelRow], wall: float) -> str:
    """``"9 rows in 61.2 s (compile variant first calls: 40.1 s)"``."""
    compile_s = sum(r.first_call_s or 0.0 for r in [*rows, *models] if r.variant == "compile")
    compile_note = f" (compile variant first calls: {compile_s:.1f} s)" if compile_s else ""
    counts = f"{len(rows)} module rows and {len(models)} model rows" if models else f"{len(rows)} rows"
    return f"{counts} in {wall:.1f} s{compile_note}"
