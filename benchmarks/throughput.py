#!/usr/bin/env python
"""Per-device throughput table of the attention modules: eager vs torch.compile vs memcpy.

For every module of ``attnkernels.reference`` (or those named with ``--modules``) at a few
ResNet stage shapes, on one device and dtype, this measures each *variant*:

* ``memcpy``  - ``x.clone()``: reads x and writes a same-size y, the floor for a
  memory-bound module; its forward+backward is ``x.clone().backward(g)`` (a copy each way);
* ``eager``   - the reference module, as written;
* ``compile`` - ``torch.compile(reference, dynamic=False)``;
* ``sdpa``    - PAM and CSM only: the same projections with the attention done by
  ``F.scaled_dot_product_attention(scale=1.0)``, the memory-efficient kernel on CUDA
  (``benchmarks/attention_baselines.py``);
* ``fused-<backend>`` - the module's fused version (``attnkernels.nn``) on one backend.

Two phases, each timed with the variants *interleaved*: after warm-up, round r times memcpy,
eager, compile, ... once each, in an order shuffled anew each round (seeded), then round r+1
does the same, and each variant's median over the rounds is reported (slow drifts in clock
speed or memory state hit all variants alike, and no variant always follows the same one).

* forward  - module in ``eval()`` mode (the inference case: BatchNorm uses running stats),
  called under ``torch.inference_mode()``;
* fwd+bwd  - module in ``train()`` mode (BatchNorm uses batch statistics), x (and any bridge
  maps) requiring grad, ``y.backward(g)`` with a fixed random ``g``; every ``.grad`` is
  reset to None after each step, as ``optimizer.zero_grad()`` does (the gradients never
  accumulate).

Timing: ``time.perf_counter`` around each call on CPU; on CUDA, CUDA events around each
call after warm-up, with the L2 cache flushed (a buffer twice its size is zeroed) before
each call, and default batch sizes that make every input larger than L2.

Per variant the table gives: forward and fwd+bwd time (ms, median); each over the memcpy
variant's time for the same phase; GB/s (``2 * x.nbytes / forward time``: read x, write y);
peak memory in MiB of one forward and one fwd+bwd step above what was allocated before it
(outputs and gradients included; ``attnkernels.profiling.peak_memory``, measured once
after the timed rounds: the profiler slows the calls that follow it); speed-up against eager (eager time / variant time).
``first_call_s`` in the CSV is the time of the warm-up calls of both phases: for
``compile`` that is the compile time (reused from the on-disk inductor cache on later runs).

Defaults keep a run on 2 CPU cores under 3 minutes even with a cold inductor cache (the C++
builds of torch.compile are most of it): one shape on CPU, two on CUDA; see DEFAULT_SHAPES.

CPU timings of memory-bound ops swing when glibc returns freed buffers to the OS, so the
script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set
when they are not (see ``attnkernels.profiling``). A module or variant that fails (a compile
error, an unsupported dtype) gets a row with the error text; the run goes on.

Whole-model rows (``--models``, code in ``benchmarks/model_rows.py``): after the module table
a second table times one training step (train mode: forward, cross-entropy on random labels,
backward; no optimizer step) of ``attnkernels.models.resnet50(attention=name)`` for each name
given, as ``eager`` (reference modules), ``compile`` (``torch.compile`` of that model; on CPU
only when ``--variants`` names it) and ``fused-<backend>`` (``attnkernels.fuse`` of a copy,
for modules with a fused version), next to the bare ``resnet50()``, all interleaved round by
round like the module variants. Per row: ms/step, images/s, overhead over the bare network
(``step / bare step - 1``, in %), speed-up over the same attention's eager model, and the peak
memory of one step. CUDA: bf16 autocast, channels_last, batch 64; CPU: fp32, NCHW, batch 8.
Default models: none on CPU (``make bench`` stays quick), ``eca,se,ham`` on CUDA;
``--model-batch``, ``--model-size`` (default 224) and ``--model-repeats`` size the run;
``--modules none`` skips the module table.

Results go to ``<out>/throughput.csv`` and ``<out>/throughput.json`` (the model rows also
to ``<out>/throughput_models.csv`` and under ``"model_rows"`` in the JSON); ``--json`` prints
the JSON document to stdout instead of the tables.

Example::

    python benchmarks/throughput.py                            # all modules, default shapes
    python benchmarks/throughput.py --modules se,ham --shapes 32x256x56x56 --dtype bfloat16
    python benchmarks/throughput.py --modules none --models ham,eca --model-size 112  # models only
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_REPO_ROOT = Path(__file__).resolve().parents[1]
if (_REPO_ROOT / "attnkernels").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))  # run from a checkout without installing
_BENCH_DIR = Path(__file__).resolve().parent
if str(_BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(_BENCH_DIR))  # model_rows.py, also when a test loads this file by path

import torch  # noqa: E402
from torch import nn  # noqa: E402

from attnkernels.profiling import (  # noqa: E402
    BENCHMARK_MALLOC_ENV,
    benchmark_env_ready,
    ensure_benchmark_env,
    peak_memory,
)
from attnkernels import backend  # noqa: E402
from attnkernels.nn import FUSED, as_fused, fused_class  # noqa: E402
from attnkernels.reference import create, names  # noqa: E402

import attention_baselines  # noqa: E402
import model_rows  # noqa: E402
from model_rows import ModelRow, ModelSettings  # noqa: E402

Shape = Tuple[int, int, int, int]
Step = Callable[[], Any]

# Default shapes: ResNet-50 stage outputs (C x H x W) at a batch that fits the time budget.
# CPU: the default run must stay under 3 minutes on 2 cores with a cold inductor cache, and
# compiling is most of it (~4 s of C++ builds per module, shape and graph; 3 graphs each):
# one shape, stage 2 at N = 4 (6.4 MB in fp32, larger than the 4 MB of L2). Pass --shapes
# for more: with a warm cache (a second run) each extra shape costs ~15-30 s.
# CUDA: stages 1 and 3 with the batch scaled so each input is 102.8 MB in fp32, twice an
# H100's 50 MB L2 (which is also flushed before each timed call); two shapes, not four,
# to keep compile time (a Triton build per kernel) within a few minutes.
DEFAULT_SHAPES: Dict[str, str] = {
    "cpu": "4x512x28x28",
    "cuda": "32x256x56x56,128x1024x14x14",
}
DEFAULT_REPEATS: Dict[str, int] = {"cpu": 7, "cuda": 50}
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# Constructor arguments a module needs beyond its channel count, by registry name.
MODULE_KWARGS: Dict[str, Callable[[int], Dict[str, Any]]] = {
    "bridge": lambda channels: {"bridge_channels": [channels]},
}
# Table-only names for a registry module built with other arguments: GAM's "gc" variant
# (group convs + channel shuffle) next to the plain one.
MODULE_ALIASES: Dict[str, Tuple[str, Dict[str, Any]]] = {"gam-gc": ("gam", {"groups": 4})}


def module_names() -> List[str]:
    """Every name the module table takes: the registry's and MODULE_ALIASES."""
    return [*names(), *MODULE_ALIASES]
MIB = 1024.0 * 1024.0
ERROR_CHARS = 300


# --------------------------------------------------------------------------- configuration


@dataclass
class Config:
    """One run's settings, resolved from the command line."""

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


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    module_list = ", ".join(module_names())
    parser = argparse.ArgumentParser(
        prog="throughput.py",
        description=(
            "Time each attention module's eager reference and torch.compile(reference) "
            "against a same-size memcpy (x.clone()), forward (eval mode, inference_mode) and "
            "forward+backward (train mode), with GB/s, peak memory and speed-ups; print a "
            "table and write throughput.csv / throughput.json."
        ),
        epilog=(
            f"modules: {module_list}. Default shapes: cpu {DEFAULT_SHAPES['cpu']}; "
            f"cuda {DEFAULT_SHAPES['cuda']} (ResNet-50 stage outputs). "
            "On Linux the script re-executes itself once with glibc malloc thresholds set "
            "(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) unless they are already set."
        ),
    )
    parser.add_argument(
        "--modules", default="all", help="comma list of module names, 'all' (default), or 'none' (models only)"
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma list of N x C x H x W shapes, e.g. 32x256x56x56,32x512x28x28 "
        "(default: per device, see below)",
    )
    parser.add_argument("--batch", type=int, default=None, help="replace N in every shape with this batch size")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="input and parameter dtype (default float32)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per phase; medians are reported "
        f"(default: cpu {DEFAULT_REPEATS['cpu']}, cuda {DEFAULT_REPEATS['cuda']})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed calls per variant and phase before timing (default 1; the first compiles)",
    )
    parser.add_argument(
        "--variants",
        default="auto",
        help=f"comma list of variants to run, from {', '.join(VARIANT_NAMES)} (default auto: memcpy, "
        "eager, compile and the fused backends available on the device)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument(
        "--models",
        default=None,
        help="comma list of attention names to put into resnet50 for the whole-model table, 'all', "
        "or 'none' (default: cpu none, cuda "
        f"{model_rows.DEFAULT_MODELS['cuda']}); the bare resnet50 is timed alongside",
    )
    parser.add_argument(
        "--model-batch",
        type=int,
        default=None,
        help="batch of the model rows "
        f"(default: cpu {model_rows.DEFAULT_MODEL_BATCH['cpu']}, cuda {model_rows.DEFAULT_MODEL_BATCH['cuda']})",
    )
    parser.add_argument(
        "--model-size",
        type=int,
        default=model_rows.DEFAULT_MODEL_SIZE,
        help=f"image size of the model rows (default {model_rows.DEFAULT_MODEL_SIZE}; e.g. 64 for a quick CPU run)",
    )
    parser.add_argument(
        "--model-repeats",
        type=int,
        default=None,
        help="timed rounds of the model rows "
        f"(default: cpu {model_rows.DEFAULT_MODEL_REPEATS['cpu']}, cuda {model_rows.DEFAULT_MODEL_REPEATS['cuda']})",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads for the run (default: torch's choice)"
    )
    parser.add_argument(
        "--out",
        default=str(_REPO_ROOT / "benchmarks" / "results"),
        help="folder for throughput.csv and throughput.json (default benchmarks/results/); '' writes nothing",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the JSON document to stdout instead of the table"
    )
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """Turn parsed arguments into a validated :class:`Config` (``ValueError`` on bad input)."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"bad --device {args.device!r}: {err}") from None
    if device.type not in DEFAULT_SHAPES:
        raise ValueError(f"device {device} is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    known = module_names()
    chosen = args.modules.strip().lower()
    modules = known if chosen == "all" else [] if chosen == "none" else [m.lower() for m in split_list(args.modules)]
    unknown = [m for m in modules if m not in known]
    if unknown or not (modules or chosen == "none"):
        raise ValueError(f"unknown module(s) {unknown or args.modules!r}; choose from {', '.join(known)}")
    shapes = [parse_shape(s) for s in split_list(args.shapes or DEFAULT_SHAPES[device.type])]
    if args.batch is not None:
        if args.batch < 1:
            raise ValueError("--batch must be >= 1")
        shapes = [(args.batch, c, h, w) for (_, c, h, w) in shapes]
    auto = args.variants.strip().lower() == "auto"
    variants = default_variants(device) if auto else split_list(args.variants)
    bad = [v for v in variants if v not in VARIANT_NAMES]
    if bad or not variants:
        raise ValueError(f"unknown variant(s) {bad or args.variants!r}; choose from {', '.join(VARIANT_NAMES)}")
    if args.no_compile:
        variants = [v for v in variants if v != "compile"]
    repeats = DEFAULT_REPEATS[device.type] if args.repeats is None else args.repeats
    if repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    models = resolve_models(args, names(), device, variants, explicit=not auto)
    if not modules and models is None:
        raise ValueError("--modules none needs --models: there would be nothing to measure")
    return Config(
        modules=modules,
        shapes=shapes,
        dtype=DTYPES[args.dtype],
        device=device,
        variants=variants,
        repeats=repeats,
        warmup=args.warmup,
        out=Path(args.out) if args.out else None,
        json_stdout=args.json,
        models=models,
    )


def resolve_models(
    args: argparse.Namespace, known: Sequence[str], device: torch.device, variants: Sequence[str], explicit: bool
) -> Optional[ModelSettings]:
    """The model rows' settings from ``--models`` and ``--model-*``, or None when no model is asked for."""
    attentions = model_rows.resolve_models(args.models, known, device)
    batch = model_rows.DEFAULT_MODEL_BATCH[device.type] if args.model_batch is None else args.model_batch
    repeats = model_rows.DEFAULT_MODEL_REPEATS[device.type] if args.model_repeats is None else args.model_repeats
    if batch < 1 or args.model_size < 1 or repeats < 1:
        raise ValueError("--model-batch, --model-size and --model-repeats must be >= 1")
    if not attentions:
        return None
    return ModelSettings(
        attentions=attentions,
        variants=model_rows.model_variants(variants, device, explicit),
        batch=batch,
        size=args.model_size,
        repeats=repeats,
        device=device,
    )


# --------------------------------------------------------------------------- inputs and variants


@dataclass
class Inputs:
    """The tensors of one (module, shape) case: plain ones for forward, leaves for fwd+bwd."""

    x: torch.Tensor
    bridges: Tuple[torch.Tensor, ...]
    grad_out: torch.Tensor
    x_leaf: torch.Tensor
    bridge_leaves: Tuple[torch.Tensor, ...]


def make_inputs(
    shape: Shape, bridge_channels: Sequence[int], dtype: torch.dtype, device: torch.device
) -> Inputs:
    """Random x (and bridge maps of x's size with the given channels) and a fixed grad_output."""
    n, _, h, w = shape
    x = torch.randn(shape, dtype=dtype, device=device)
    bridges = tuple(torch.randn((n, c, h, w), dtype=dtype, device=device) for c in bridge_channels)
    grad_out = torch.randn(shape, dtype=dtype, device=device)
    return Inputs(
        x=x,
        bridges=bridges,
        grad_out=grad_out,
        x_leaf=x.detach().clone().requires_grad_(True),
        bridge_leaves=tuple(b.detach().clone().requires_grad_(True) for b in bridges),
    )


def build_module(name: str, channels: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The registry's reference module for ``name`` (or an alias's), on ``device`` in ``dtype``."""
    name, kwargs = MODULE_ALIASES.get(name, (name, {}))
    kwargs = {**MODULE_KWARGS.get(name, lambda c: {})(channels), **kwargs}
    return create(name, channels, **kwargs).to(device=device, dtype=dtype)


def bridge_channels_of(module: nn.Module) -> List[int]:
    """Channel counts of the bridge maps ``module.forward`` takes after x (none for most)."""
    if not getattr(module, "takes_bridges", False):
        return []
    return list(getattr(module, "bridge_channels", []))


def memcpy_fn(x: torch.Tensor, *bridges: torch.Tensor) -> torch.Tensor:
    """The memcpy variant: a same-size copy of x (its backward copies g into x.grad)."""
    return x.clone()


def compile_module(module: nn.Module) -> Callable[..., torch.Tensor]:
    """``torch.compile`` with static shapes: each shape gets kernels specialised to it."""
    return torch.compile(module, dynamic=False)


def fused_variant(module: nn.Module, backend_name: str) -> Callable[..., torch.Tensor]:
    """The module's fused version (``attnkernels.nn``) forced onto one backend."""
    fused = as_fused(module)

    def run(x: torch.Tensor, *bridges: torch.Tensor) -> torch.Tensor:
        with backend.use_backend(backend_name):
            return fused(x, *bridges)

    return run


FUSED_BACKENDS: Tuple[str, ...] = ("cpu", "cuda", "triton")

# How each variant turns the reference module into a callable ``f(x, *bridges)``; compiled
# and fused variants wrap the same module object, so they share its weights and mode.
VARIANT_BUILDERS: Dict[str, Callable[[nn.Module], Callable[..., torch.Tensor]]] = {
    "memcpy": lambda module: memcpy_fn,
    "eager": lambda module: module,
    "compile": compile_module,
    "sdpa": attention_baselines.sdpa_variant,
    **{f"fused-{b}": (lambda module, b=b: fused_variant(module, b)) for b in FUSED_BACKENDS},
}
VARIANT_NAMES: Tuple[str, ...] = tuple(VARIANT_BUILDERS)


def default_variants(device: torch.device) -> List[str]:
    """memcpy, eager, compile, sdpa (PAM and CSM rows only), and every fused backend that
    runs on ``device`` (Triton on CPU is its interpreter, a test tool, so it is left out there)."""
    fused = [
        f"fused-{b}"
        for b in FUSED_BACKENDS
        if not (b == "triton" and device.type == "cpu") and backend.why_unavailable(b, "channel_gate", device) is None
    ]
    return ["memcpy", "eager", "compile", "sdpa", *fused]


def build_variant(variant: str, module: nn.Module) -> Callable[..., torch.Tensor]:
    """The callable ``f(x, *bridges)`` that ``variant`` times for ``module``."""
    return VARIANT_BUILDERS[variant](module)


def forward_step(f: Callable[..., torch.Tensor], inputs: Inputs) -> Step:
    """One inference forward: ``f(x, *bridges)`` under ``torch.inference_mode()``."""

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return f(inputs.x, *inputs.bridges)

    return step


def training_step(f: Callable[..., torch.Tensor], inputs: Inputs, params: Sequence[torch.Tensor]) -> Step:
    """One forward+backward: ``y = f(x, *bridges)``, ``y.backward(g)``, grads reset to None.

    The grads are detached at the end of the step rather than the start of the next, so a
    step leaves nothing behind (peak-memory measurement then sees no frees of older
    tensors); x's gradient is returned, like an output, and freed by the caller.
    """
    leaves = (inputs.x_leaf, *inputs.bridge_leaves, *params)

    def step() -> Optional[torch.Tensor]:
        y = f(inputs.x_leaf, *inputs.bridge_leaves)
        y.backward(inputs.grad_out)
        grad = inputs.x_leaf.grad
        clear_grads(leaves)
        return grad

    return step


def clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    """Set ``.grad`` of each tensor to None (what ``zero_grad(set_to_none=True)`` does)."""
    for t in tensors:
        t.grad = None


# --------------------------------------------------------------------------- timing


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
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20)
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


def make_timer(device: torch.device) -> Callable[[Step], float]:
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
    """What one phase (forward or fwd+bwd) measured for one variant."""

    times_ms: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    first_call_s: float = 0.0
    error: Optional[str] = None

    @property
    def median_ms(self) -> Optional[float]:
        """Median of the timed rounds, or None if the variant failed or was not timed."""
        return statistics.median(self.times_ms) if self.times_ms and self.error is None else None


def run_phase(steps: Dict[str, Step], cfg: Config, timer: Callable[[Step], float]) -> Dict[str, PhaseResult]:
    """Warm up, time all variants round by round (each round in a new order), then measure
    peak memory once.

    A variant that raises is dropped from the rest of the phase with its error recorded.
    """
    results = {name: PhaseResult() for name in steps}
    live = dict(steps)

    def attempt(name: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as err:  # a failing variant must not end the run
            results[name].error = error_text(err)
            live.pop(name, None)

    for name, step in list(live.items()):
        start = time.perf_counter()
        for _ in range(cfg.warmup):
            attempt(name, step)
            if name not in live:
                break
        synchronize(cfg.device)
        results[name].first_call_s = time.perf_counter() - start
    # Each round runs the variants in a new (seeded) order: a variant pays for the memory
    # traffic its predecessor left behind (dirty lines still being written back, the heap
    # placement of its outputs), and a fixed order charged that to the same variant every
    # round (measured on CPU: a fused op 1.5 ms right after a clone, 2.2-2.5 ms right after
    # the eager module that writes twice as much).
    order = random.Random(0)
    for _ in range(cfg.repeats):
        names = list(live)
        order.shuffle(names)
        for name in names:
            if name in live:
                step = live[name]
                attempt(name, lambda: results[name].times_ms.append(timer(step)))
    # Peak memory last: the profiler it runs slows the calls after it (measured on CPU:
    # memcpy 1.09 -> 1.51 ms, a fused op 1.75 -> 2.92 ms), so it must not precede timing.
    for name, step in list(live.items()):
        attempt(name, lambda: setattr(results[name], "peak_bytes", peak_memory(step, cfg.device)))
    return results


# --------------------------------------------------------------------------- one case


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


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


def row_key(name: str, shape: Shape, cfg: Config) -> Dict[str, str]:
    """The identifying fields every row of one case shares."""
    return dict(module=name, shape=shape_str(shape), dtype=dtype_name(cfg.dtype), device=str(cfg.device))


def make_rows(
    name: str,
    shape: Shape,
    cfg: Config,
    x_bytes: int,
    fwd: Dict[str, PhaseResult],
    bwd: Dict[str, PhaseResult],
    flops: Tuple[Optional[int], Optional[int]] = (None, None),
) -> List[Row]:
    """Rows for one case from its two phases, with ratios to memcpy and eager filled in, and
    the attention's TFLOP/s when ``flops`` (forward, forward+backward) are given."""
    base = row_key(name, shape, cfg)
    memcpy_f = fwd["memcpy"].median_ms if "memcpy" in fwd else None
    memcpy_b = bwd["memcpy"].median_ms if "memcpy" in bwd else None
    eager_f = fwd["eager"].median_ms if "eager" in fwd else None
    eager_b = bwd["eager"].median_ms if "eager" in bwd else None
    compile_f = fwd["compile"].median_ms if "compile" in fwd else None
    compile_b = bwd["compile"].median_ms if "compile" in bwd else None
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


def failed_rows(name: str, shape: Shape, cfg: Config, err: BaseException) -> List[Row]:
    """Rows for a case whose module could not be built: one per non-memcpy variant."""
    base = row_key(name, shape, cfg)
    return [
        Row(**base, variant=v, error=error_text(err))
        for v in cfg.variants
        if v != "memcpy"
        and (not v.startswith("fused-") or name in FUSED)
        and (v != "sdpa" or name in attention_baselines.SDPA_MODULES)
    ]


def reset_compiler() -> None:
    """Drop torch.compile's in-memory caches (the on-disk inductor cache stays)."""
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and hasattr(dynamo, "reset"):
        dynamo.reset()


def run_case(name: str, shape: Shape, cfg: Config, timer: Callable[[Step], float]) -> List[Row]:
    """Measure every variant of one (module, shape): forward phase, then fwd+bwd phase."""
    torch.manual_seed(0)
    if "compile" in cfg.variants:
        reset_compiler()  # one module's graphs never count against another's recompile limit
    try:
        module = build_module(name, shape[1], cfg.dtype, cfg.device)
        inputs = make_inputs(shape, bridge_channels_of(module), cfg.dtype, cfg.device)
    except Exception as err:
        return failed_rows(name, shape, cfg, err)
    fns: Dict[str, Callable[..., torch.Tensor]] = {}
    build_errors: Dict[str, str] = {}
    for variant in cfg.variants:
        if variant.startswith("fused-") and fused_class(module) is None:
            continue  # no fused version of this module yet: no row, rather than an error row
        if variant == "sdpa" and not attention_baselines.supports(module):
            continue  # an attention baseline: position-attention modules only
        try:
            fns[variant] = build_variant(variant, module)
        except Exception as err:
            build_errors[variant] = error_text(err)
    params = [p for p in module.parameters() if p.requires_grad]

    module.eval()
    fwd = run_phase({v: forward_step(f, inputs) for v, f in fns.items()}, cfg, timer)
    module.train()
    bwd = run_phase({v: training_step(f, inputs, params) for v, f in fns.items()}, cfg, timer)
    for variant, err_text in build_errors.items():
        fwd[variant] = PhaseResult(error=err_text)
        bwd[variant] = PhaseResult(error=err_text)
    order = {v: i for i, v in enumerate(cfg.variants)}
    fwd = dict(sorted(fwd.items(), key=lambda kv: order[kv[0]]))
    flops = (attention_baselines.attention_flops(module, shape, False), attention_baselines.attention_flops(module, shape, True))
    return make_rows(name, shape, cfg, inputs.x.nbytes, fwd, bwd, flops)


def run_models(cfg: Config, timer: Callable[[Step], float]) -> List[ModelRow]:
    """Time the training step of every model variant (``benchmarks/model_rows.py``) in one
    phase, interleaved round by round like a module's variants, bare resnet50 included."""
    settings = cfg.models
    assert settings is not None
    if "compile" in settings.variants:
        reset_compiler()
    build_errors: Dict[str, str] = {}
    steps = model_rows.build_steps(settings, lambda key, err: build_errors.__setitem__(key, error_text(err)))
    results = run_phase(steps, replace(cfg, repeats=settings.repeats), timer)
    results.update({key: PhaseResult(error=text) for key, text in build_errors.items()})
    return model_rows.make_rows(results, settings, MIB)


# --------------------------------------------------------------------------- output


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
    """What a reader needs to reproduce or compare a run."""
    return {
        "device": device_description(cfg.device),
        "dtype": dtype_name(cfg.dtype),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "variants": cfg.variants,
        "modules": cfg.modules,
        "shapes": [shape_str(s) for s in cfg.shapes],
        "malloc_env": {k: os.environ.get(k) for k in BENCHMARK_MALLOC_ENV},
        "busy_cores_at_start": busy_cores() if cfg.device.type == "cpu" else None,
        "forward_mode": "eval() under torch.inference_mode()",
        "fwd_bwd_mode": "train(), y.backward(g) with a fixed random g, grads set to None after each step",
        "timer": (
            "CUDA events, L2 flushed before each call" if cfg.device.type == "cuda" else "time.perf_counter"
        ),
        "models": None if cfg.models is None else model_rows.settings_metadata(cfg.models),
    }


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


def format_cell(value: Any, width: int, fmt: str) -> str:
    """One right-aligned cell (left-aligned for text); '-' for a missing number."""
    if fmt == "s":
        return f"{str(value):<{width}}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}{fmt}}"


def title_line(meta: Dict[str, Any]) -> str:
    """What every table of a run shares: device, torch version, threads."""
    return f"attnkernels throughput | device {meta['device']} | torch {meta['torch']} | threads {meta['threads']}"


def table_header(meta: Dict[str, Any]) -> str:
    """Title lines and column headers of the printed table."""
    title = f"{title_line(meta)} | dtype {meta['dtype']} | median of {meta['repeats']} interleaved rounds"
    modes = f"fwd: {meta['forward_mode']}; f+b: {meta['fwd_bwd_mode']}"
    legend = (
        "cpy: memcpy (x.clone()) time; GB/s: 2*x.nbytes / fwd time; pk: peak memory above the "
        "start, outputs and grads included; spd: eager time / variant time; vs cmp: compile time / variant time; "
        "TF/s: PAM/CSM attention FLOPs (no recompute) / time; sdpa: the projections + scaled_dot_product_attention"
    )
    cols = " ".join(format_cell(h, w, "s") if f == "s" else f"{h:>{w}}" for h, _, w, f in TABLE)
    return "\n".join([title, modes, legend, cols, "-" * len(cols)])


def format_line(values: Dict[str, Any], table: Sequence[Tuple[str, str, int, str]]) -> str:
    """One table line: the cells of ``table``'s columns, then the row's error if it has one."""
    line = " ".join(format_cell(values[key], w, f) for _, key, w, f in table)
    if values.get("error"):
        line += f"  ! {values['error']}"
    return line.rstrip()


def format_group(rows: Sequence[Row]) -> str:
    """Table lines of one (module, shape) group; module and shape only on its first line."""
    lines = []
    for i, row in enumerate(rows):
        values = asdict(row)
        if i > 0:
            values["module"] = values["shape"] = ""
        lines.append(format_line(values, TABLE))
    return "\n".join(lines)


def format_model_rows(rows: Sequence[ModelRow]) -> str:
    """Table lines of the model rows; each attention name only on its first line."""
    lines = []
    for i, row in enumerate(rows):
        values = asdict(row)
        if i > 0 and row.attention == rows[i - 1].attention:
            values["attention"] = ""
        lines.append(format_line(values, model_rows.MODEL_TABLE))
    return "\n".join(lines)


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


def write_results(
    rows: Sequence[Row], meta: Dict[str, Any], out: Path, models: Sequence[ModelRow] = ()
) -> List[Path]:
    """Write ``throughput.csv``, ``throughput.json`` and, when there are model rows,
    ``throughput_models.csv`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "throughput.csv", out / "throughput.json"
    write_csv(csv_path, COLUMNS, rows)
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(json_document(rows, meta, models), fh, indent=1)
        fh.write("\n")
    paths = [csv_path, json_path]
    if models:
        paths.append(out / "throughput_models.csv")
        write_csv(paths[-1], model_rows.MODEL_COLUMNS, models)
    return paths


def json_document(
    rows: Sequence[Row], meta: Dict[str, Any], models: Sequence[ModelRow] = ()
) -> Dict[str, Any]:
    """``{"meta": ..., "rows": [...]}`` (and ``"model_rows": [...]`` when there are model
    rows) with numbers rounded like the CSV."""
    doc: Dict[str, Any] = {"meta": meta, "rows": [{k: rounded(v) for k, v in asdict(r).items()} for r in rows]}
    if models:
        doc["model_rows"] = [{k: rounded(v) for k, v in asdict(r).items()} for r in models]
    return doc


# --------------------------------------------------------------------------- main


def quiet_noise() -> None:
    """Silence one-line warnings that say nothing about the benchmark itself."""
    # Inductor's C++ build on a CUDA build of torch without a GPU warns about CUDA_HOME.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark described by ``argv`` (default: ``sys.argv[1:]``); 0 on success.

    Does not re-execute the process (that happens only under ``__main__``), so tests can
    call it in-process.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if cfg.device.type == "cuda" and cfg.device.index is not None:
        torch.cuda.set_device(cfg.device)  # CUDA events record on the current device's stream
    quiet_noise()
    stream = sys.stderr if cfg.json_stdout else sys.stdout  # --json keeps stdout for the document

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    if cfg.device.type == "cpu" and not benchmark_env_ready():
        say("note: glibc malloc thresholds not set; CPU timings of memory-bound ops may swing")
    meta = run_metadata(cfg)
    busy = meta["busy_cores_at_start"]
    if busy is not None and busy > 0.25:
        say(f"note: other processes keep {busy} of {os.cpu_count()} cores busy; CPU timings will be noisy")
    timer = make_timer(cfg.device)
    rows: List[Row] = []
    start = time.perf_counter()
    if cfg.modules:
        say(table_header(meta))
    for name in cfg.modules:
        for shape in cfg.shapes:
            group = run_case(name, shape, cfg, timer)
            rows.extend(group)
            say(format_group(group))
    models: List[ModelRow] = []
    if cfg.models is not None:
        say("" if cfg.modules else title_line(meta))
        say(model_rows.table_header(cfg.models))
        models = run_models(cfg, timer)
        say(format_model_rows(models))
    wall = time.perf_counter() - start
    meta["wall_s"] = round(wall, 1)
    compile_s = sum(r.first_call_s or 0.0 for r in [*rows, *models] if r.variant == "compile")
    compile_note = f" (compile variant first calls: {compile_s:.1f} s)" if compile_s else ""
    counts = f"{len(rows)} module rows and {len(models)} model rows" if models else f"{len(rows)} rows"
    say(f"{counts} in {wall:.1f} s{compile_note}")
    if cfg.out is not None:
        paths = write_results(rows, meta, cfg.out, models)
        say(f"wrote {', '.join(str(p) for p in paths[:-1])} and {paths[-1]}")
    if cfg.json_stdout:
        print(json.dumps(json_document(rows, meta, models), indent=1))
    return 0


if __name__ == "__main__":
    ensure_benchmark_env()
    sys.exit(main())
