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
* ``fused-<backend>`` - the module's fused version (``attnkernels.nn``) on one backend, for
  each backend that runs every hot path of the fused class (its ``hot_paths``) on the device.

Two phases, each timed with the variants *interleaved*: after warm-up, round r times memcpy,
eager, compile, ... once each, in an order shuffled anew each round (seeded), then round r+1
does the same, and each variant's median over the rounds is reported (slow drifts in clock
speed or memory state hit all variants alike, and no variant always follows the same one).
After ``--repeats`` rounds (default 21 on CPU) a phase goes on while it has run for less than
``--min-time`` seconds (default 1 on CPU), up to ten times the rounds: a cheap case gets the
rounds its noise needs, a costly one keeps its time.

* forward  - module in ``eval()`` mode (the inference case: BatchNorm uses running stats),
  called under ``torch.inference_mode()``;
* fwd+bwd  - module in ``train()`` mode (BatchNorm uses batch statistics), x (and any bridge
  maps) requiring grad, ``y.backward(g)`` with a fixed random ``g``; every ``.grad`` is
  reset to None after each step, as ``optimizer.zero_grad()`` does (the gradients never
  accumulate).

Timing: ``time.perf_counter`` around each call on CPU; on CUDA, CUDA events around each
call after warm-up, with the L2 cache flushed (a buffer twice its size is zeroed) before
each call. Every case rotates among copies of its inputs totalling at least twice the
last-level cache (read from sysfs / lscpu on CPU, the L2 size on CUDA; printed in the table
header and recorded in the JSON metadata), so no call finds its input in cache whatever ran
before it (``benchmarks/harness/cache.py`` says why rotation rather than larger inputs).

Per variant the table gives: forward and fwd+bwd time (ms, median); each over the memcpy
variant's time for the same phase; GB/s (``2 * x.nbytes / forward time``: read x, write y);
peak memory in MiB of one forward and one fwd+bwd step above what was allocated before it
(outputs and gradients included; ``attnkernels.profiling.peak_memory``, measured once
after the timed rounds: the profiler slows the calls that follow it); speed-up against eager
(eager time / variant time) and against compile.
``first_call_s`` in the CSV is the time of the warm-up calls of both phases: for
``compile`` that is the compile time (reused from the on-disk inductor cache on later runs).

Defaults: one shape on CPU, two on CUDA (see ``harness/config.py``). A cold run takes
minutes (the compiled ops build on first use, torch.compile builds kernels per module), so
progress goes to stderr: a ``[setup]`` line before and after finding the fused backends
(which builds the compiled ops on first use), then a line when each case starts and when it
is done (``[3/13] ham 4x512x28x28: compiling and timing...``, ``... done in 12.3 s (...)``).

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

Results go to ``<out>/throughput.csv``, ``<out>/throughput.json`` and ``<out>/throughput.png``
(per module, each variant's time over memcpy's, forward and forward+backward; needs
matplotlib, else a one-line note), the model rows also to ``<out>/throughput_models.csv``
and under ``"model_rows"`` in the JSON; ``--json`` prints the JSON document to stdout
instead of the tables.

This file is the command line only (options, their checks, ``main``); the harness it runs
is ``benchmarks/harness/`` (one file per job: see its ``__init__``).

Example::

    python benchmarks/throughput.py                            # all modules, default shapes
    python benchmarks/throughput.py --modules se,ham --shapes 32x256x56x56 --dtype bfloat16
    python benchmarks/throughput.py --modules none --models ham,eca --model-size 112  # models only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

_REPO_ROOT = Path(__file__).resolve().parents[1]
if (_REPO_ROOT / "attnkernels").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))  # run from a checkout without installing
_BENCH_DIR = Path(__file__).resolve().parent
if str(_BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(_BENCH_DIR))  # harness/, model_rows.py, also when a test loads this file by path

import torch  # noqa: E402

from attnkernels import choose  # noqa: E402
from attnkernels.profiling import benchmark_env_ready, ensure_benchmark_env  # noqa: E402
from attnkernels.reference import names  # noqa: E402

import model_rows  # noqa: E402
from harness.cache import last_level_cache  # noqa: E402
from harness.config import (  # noqa: E402
    DEFAULT_MIN_TIME_S,
    DEFAULT_REPEATS,
    DEFAULT_SHAPES,
    DTYPES,
    MAX_ROUNDS_FACTOR,
    Config,
    parse_shape,
    split_list,
)
from harness.machine import run_metadata  # noqa: E402
from harness.output import json_document, write_results  # noqa: E402
from harness.run import Progress, quiet_noise, run_tables, summary_line  # noqa: E402
from harness.timing import make_timer  # noqa: E402
from harness.variants import VARIANT_NAMES, default_variants, module_names  # noqa: E402
from model_rows import ModelSettings  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    module_list = ", ".join(module_names())
    parser = argparse.ArgumentParser(
        prog="throughput.py",
        description=(
            "Time each attention module's eager reference and torch.compile(reference) "
            "against a same-size memcpy (x.clone()), forward (eval mode, inference_mode) and "
            "forward+backward (train mode), with GB/s, peak memory and speed-ups; print a "
            "table and write throughput.csv / throughput.json / throughput.png."
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
        help="comma list of N x C x H x W shapes, e.g. 32x256x56x56,32x512x28x28, measured as given "
        "(default: per device, see below); inputs rotate among copies totalling 2x the last-level cache",
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
        "--min-time",
        type=float,
        default=None,
        help="after the rounds of --repeats, a phase goes on round by round while it has run for "
        f"less than this many seconds, up to {MAX_ROUNDS_FACTOR}x the rounds (default: cpu "
        f"{DEFAULT_MIN_TIME_S['cpu']:g}, cuda {DEFAULT_MIN_TIME_S['cuda']:g}; 0 with an explicit --repeats)",
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
        "eager, compile, sdpa and the fused backends that run here; a module gets a fused-<backend> row "
        "only where that backend runs every hot path of its fused class)",
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
        help="folder for throughput.csv, .json and .png (default benchmarks/results/); '' writes nothing",
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
    variants = auto_variants(device) if auto else split_list(args.variants)
    bad = [v for v in variants if v not in VARIANT_NAMES]
    if bad or not variants:
        raise ValueError(f"unknown variant(s) {bad or args.variants!r}; choose from {', '.join(VARIANT_NAMES)}")
    if args.no_compile:
        variants = [v for v in variants if v != "compile"]
    repeats = DEFAULT_REPEATS[device.type] if args.repeats is None else args.repeats
    if args.min_time is not None:
        min_time_s = args.min_time
    else:
        min_time_s = DEFAULT_MIN_TIME_S[device.type] if args.repeats is None else 0.0
    if repeats < 1 or args.warmup < 0 or min_time_s < 0:
        raise ValueError("--repeats must be >= 1, --warmup and --min-time >= 0")
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
        cache=last_level_cache(device),
        min_time_s=min_time_s,
    )


def auto_variants(device: torch.device) -> List[str]:
    """``default_variants(device)``, with a line on stderr before and after: asking which
    backends run builds the compiled ops on first use (minutes on 2 cores)."""
    start = time.perf_counter()
    Progress.emit(f"[setup] which fused backends run on {device.type} (the compiled ops build on first use)...")
    variants = default_variants(device)
    fused = [v for v in variants if v.startswith("fused-")]
    Progress.emit(f"[setup] done in {time.perf_counter() - start:.1f} s: {', '.join(fused) or 'no fused backend'}")
    return variants


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
    start = time.perf_counter()
    rows, models = run_tables(cfg, meta, make_timer(cfg.device), say)
    wall = time.perf_counter() - start
    meta["wall_s"] = round(wall, 1)
    say(summary_line(rows, models, wall))
    # Which algorithms the fused rows ran, measured the first time each shape was seen.
    say(choose.explain())
    meta["choose_mode"] = choose.current_mode()
    meta["choices"] = [c.strip() for c in choose.explain().splitlines()[1:]]
    if cfg.out is not None:
        paths, notes = write_results(rows, meta, cfg.out, models)
        say(f"wrote {', '.join(str(p) for p in paths[:-1])} and {paths[-1]}")
        for note in notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    if cfg.json_stdout:
        print(json.dumps(json_document(rows, meta, models), indent=1))
    return 0


if __name__ == "__main__":
    ensure_benchmark_env()
    sys.exit(main())
