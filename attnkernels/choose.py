"""Choosing between algorithms by measurement, the first time a shape is seen.

Some choices depend on the machine and the shape: whether a grouped conv runs faster on the
library's direct kernels or on oneDNN/cuDNN, or whether the fused op beats the eager torch
composition at all. Rules tuned on one machine lose on another, so such a choice is measured
(as `torch.backends.cudnn.benchmark` does): at the first call with a new key, each candidate
runs on copies of the inputs (forward, and backward when autograd records), the fastest median
wins, and that winner is used for the key from then on in this process (results stay bitwise
repeatable), and across processes when a choices file is set.

Every choice site lists its candidates, the eager composition of torch ops among them, and a
static rule. Modes (`ATTNKERNELS_CHOOSE`, or `with choose.mode("static"): ...`):

* `measure` (default): measure the first time, as above.
* `static`: the static rule, never measured (reproducible runs, and the tests).

No measurement runs where timing would be meaningless or impossible: under torch.compile's
tracing, torch.jit tracing, on fake or meta tensors. There a key already chosen is used, else
the static rule (and nothing is remembered).

`ATTNKERNELS_CHOICES_FILE=<path>`: a JSON file of choices, read at the first choice and
written after each new one, keyed by this machine (CPU model, threads, torch version; the GPU's
name) so that a file shared across machines does not carry one machine's winner to another.
`explain()` lists the choices made and their measured times.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._env import setting

ENV_MODE = "ATTNKERNELS_CHOOSE"
ENV_FILE = "ATTNKERNELS_CHOICES_FILE"
MODES = ("measure", "static")
#: Rounds of timing: each round runs every candidate once, in turn (interleaved, so a slow
#: patch of a shared machine hits all of them), after one warm-up run each (which absorbs
#: one-time costs: oneDNN primitive creation, Triton compiles). At least MIN_ROUNDS, then
#: more while the time spent stays under BUDGET_S, up to MAX_ROUNDS; the median decides.
MIN_ROUNDS = 3
MAX_ROUNDS = 9
BUDGET_S = 0.5

_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnkernels_choose_mode", default=None)
_lock = threading.Lock()
_choices: dict[str, Choice] = {}
_file_loaded: str | None = None
#: (site, key) -> winner of the keys `pick` has answered from `_choices`: its fast path, a dict
#: lookup on the key tuple (no text key, no lock) for the calls after the first. The choice is
#: made once per key; its cost on every call is what a fused module adds around its kernels,
#: which decides small shapes and, on GPUs, any shape the host cannot keep ahead of.
_answered: dict[tuple[str, tuple], str] = {}


@dataclass
class Choice:
    """One decision: at `site` for `key`, `winner` out of `candidates`, and how it was made."""

    site: str
    key: str
    winner: str
    how: str  # "measured", "file" (a choices file's), "static"
    times_ms: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in self.times_ms.items())
        return f"{self.site} [{self.key}]: {self.winner} ({self.how}{': ' + times if times else ''})"


@contextlib.contextmanager
def mode(name: str | None) -> Iterator[None]:
    """Choose by `name` ("measure" or "static") in this block; None: the environment's."""
    token = _mode.set(_check_mode(name, "choose.mode(name)") if name is not None else None)
    try:
        yield
    finally:
        _mode.reset(token)


def current_mode() -> str:
    """The mode in force: the innermost `mode(...)` block, else ATTNKERNELS_CHOOSE, else measure."""
    return _mode.get() or _check_mode(setting(ENV_MODE) or "measure", ENV_MODE)


def _check_mode(name: str, where: str) -> str:
    if name not in MODES:
        raise ValueError(f"attnkernels: {where} must be one of {', '.join(MODES)}; got {name!r}")
    return name


def choose(site: str, key: tuple, candidates: Sequence[str], static: str,
           measure: Callable[[str], float] | None, can_measure: bool = True) -> str:
    """The candidate to run at `site` for `key` (a tuple of constants: shapes, dtype, flags).

    `static` (one of `candidates`) is the static rule's answer. `measure(name)` returns the
    seconds one run of candidate `name` takes (`time_once` makes one); it is called in
    interleaved rounds (the first run of each is a warm-up), only in measure mode, when
    `can_measure` and the key is new. The lowest median wins; ties go to the earlier candidate.
    Under torch.compile, call `decide` instead: it never measures.
    """
    known = decide(site, key, tuple(candidates), static)
    if current_mode() == "static" or _lookup(site, key, candidates) is not None:
        return known
    if not can_measure or measure is None:
        return static
    times = {name: statistics.median(samples) * 1e3 for name, samples in _rounds(candidates, measure).items()}
    winner = min(candidates, key=lambda name: (times[name], candidates.index(name)))
    full_key = _full_key(site, key)
    with _lock:
        _choices.setdefault(full_key, Choice(site, _key_text(key), winner, "measured", times))
        _save_file()
        return _choices[full_key].winner


def pick(site: str, key: tuple, runs: dict[str, Callable[..., Any]], static: str,
         args: Sequence[Any]) -> Callable[..., Any]:
    """The function to call as `fn(*args)` at `site` for `key`, out of `runs` (candidate name ->
    function, in tie-break order, the eager torch composition among them): `pick_name` with each
    candidate timed on copies of `args` (forward, and backward when autograd records)."""
    known = known_winner(site, key, runs, static)
    if known is not None:
        return runs[known]
    prepared: dict[str, Callable[[], Any]] = {}  # each candidate's copies, made once

    def measure(name: str) -> float:
        return measure_candidate(name, runs[name], args, prepared)

    def can_measure() -> bool:
        return measurable(*(a for a in args if isinstance(a, torch.Tensor)))

    return runs[pick_name(site, key, tuple(runs), static, measure, can_measure)]


def pick_name(site: str, key: tuple, names: tuple[str, ...], static: str, measure: Callable[[str], float],
              can_measure: Callable[[], bool]) -> str:
    """The candidate among `names` to run at `site` for `key`: `decide` under torch.compile, the
    static rule in static mode, else the winner chosen before (a dict lookup on the key tuple,
    the cost every later call pays), else `choose` with `measure(name)` (seconds of one run),
    when `can_measure()`. A call that cannot measure takes the static rule and leaves the key
    to the next call that can."""
    if torch.compiler.is_compiling():
        return decide(site, key, names, static)
    if static not in names:
        raise ValueError(f"attnkernels: {site}: the static choice {static!r} is not a candidate {names}")
    if current_mode() == "static":
        return static
    known = _answered.get((site, key))
    if known is not None and known in names:
        return known
    able = can_measure()
    winner = choose(site, key, names, static, measure, able)
    if able or _lookup(site, key, names) is not None:  # a lasting choice, not a fallback
        _answered[(site, key)] = winner
    return winner


def known_winner(site: str, key: tuple, names: Collection[str], static: str) -> str | None:
    """`pick_name`'s answer where it is a lookup (a winner chosen before, measure mode, not
    compiling), else None: the fast path for the calls after a key's first, taken before any
    candidate closure is built. A fused module's host path runs cold in a network (the maps
    between two of its calls push it out of the caches), where every layer of it costs several
    times its hot time. Not while compiling: the graph takes `decide`'s answer, and dynamo
    puts no guard on `_answered`."""
    if torch.compiler.is_compiling():
        return None
    known = _answered.get((site, key))
    if known in names and static in names and current_mode() != "static":
        return known
    return None


def answered(site: str, key: tuple) -> str | None:
    """The winner `pick_name` returned before for `key` at `site` in this process, if any: the
    fast path for callers whose candidates cost more to list than this lookup."""
    return _answered.get((site, key))


def pick_setting(site: str, key: tuple, settings: Sequence[int], static: int, run: Callable[[int], Any],
                 tensors: Sequence[torch.Tensor]) -> int:
    """The value among `settings` of a kernel parameter that cuts the work differently without
    changing the math (a thread split's tile, say) for which `run(value)` is fastest: `pick_name`
    over the values, each timed by `measure_setting` on the caller's own arguments (`run` only
    writes fresh outputs, so no copies are needed); `static` is the rule's value. Ties go to the
    earlier value: list the rule's first."""
    names = tuple(str(value) for value in dict.fromkeys(settings))
    known = known_winner(site, key, names, str(static))
    if known is not None:
        return int(known)
    device = next(t.device for t in tensors)

    def measure(name: str) -> float:
        return measure_setting(site, int(name), run, device)

    return int(pick_name(site, key, names, str(static), measure, lambda: measurable(*tensors)))


def measure_setting(site: str, value: int, run: Callable[[int], Any], device: torch.device) -> float:
    """Seconds one `run(value)` takes at `site` (`time_once`, without autograd): the clock of
    `pick_setting`, which tests replace."""
    with torch.no_grad():
        return time_once(lambda: run(value), device)


def measure_candidate(name: str, fn: Callable[..., Any], args: Sequence[Any],
                      prepared: dict[str, Callable[[], Any]]) -> float:
    """Seconds one run of candidate `name`, `fn(*args)`, takes on copies of args (forward, and
    backward when autograd records; the copies made at the first call, kept in `prepared`).
    The one clock of `pick`: tests replace it."""
    if name not in prepared:
        prepared[name] = forward_backward(fn, args)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    return time_once(prepared[name], device)


def _rounds(candidates: Sequence[str], measure: Callable[[str], float]) -> dict[str, list[float]]:
    """Seconds per run of each candidate, MIN_ROUNDS to MAX_ROUNDS interleaved rounds after a
    warm-up run each."""
    for name in candidates:
        measure(name)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    spent = 0.0
    for done in range(1, MAX_ROUNDS + 1):
        for name in candidates:
            samples[name].append(measure(name))
            spent += samples[name][-1]
        if done >= MIN_ROUNDS and spent > BUDGET_S:
            break
    return samples


def decide(site: str, key: tuple, candidates: tuple[str, ...], static: str) -> str:
    """What `choose` answers without measuring: the static rule in static mode or for a new
    key, else the winner chosen before. Dynamo calls it while tracing and keeps the result as
    a constant (below), so a compiled graph holds the choice eager runs made."""
    if static not in candidates:
        raise ValueError(f"attnkernels: {site}: the static choice {static!r} is not a candidate {candidates}")
    if current_mode() == "static":
        return static
    winner = _lookup(site, key, candidates)
    return static if winner is None else winner


# As attnkernels.backend.select: torch.compiler.assume_constant_result without importing dynamo.
decide._dynamo_marked_constant = True


def _lookup(site: str, key: tuple, candidates: Sequence[str]) -> str | None:
    with _lock:
        _load_file()
        known = _choices.get(_full_key(site, key))
    return known.winner if known is not None and known.winner in candidates else None


def _key_text(key: tuple) -> str:
    return " ".join(str(part).replace("torch.", "") for part in key)


def _full_key(site: str, key: tuple) -> str:
    return f"{site}|{_key_text(key)}"


def time_once(run: Callable[[], Any], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one `run()` from cold caches, as a network's activations arrive: on CPU the
    last-level cache is flushed first (inputs that fit would otherwise be timed warm, which
    favours candidates that read them twice); on CUDA, synchronised around the run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:
        _flush_cpu_caches()
    start = clock()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


_flush_buffer: torch.Tensor | None = None


def _flush_cpu_caches() -> None:
    """Write a buffer twice the last-level cache's size (glibc's report, else 32 MiB)."""
    global _flush_buffer
    if _flush_buffer is None:
        try:
            llc = os.sysconf("SC_LEVEL3_CACHE_SIZE") or os.sysconf("SC_LEVEL2_CACHE_SIZE")
        except (ValueError, OSError, AttributeError):
            llc = 0
        # A normal tensor even when the first measurement runs under inference_mode (an
        # inference tensor could not be written outside it).
        with torch.inference_mode(False):
            _flush_buffer = torch.zeros(2 * max(llc, 32 << 20) // 4, dtype=torch.float32)
    with torch.no_grad():
        _flush_buffer.add_(1.0)


def forward_backward(fn: Callable[..., Any], args: Sequence[Any]) -> Callable[[], Any]:
    """A run of `fn` on copies of `args` (tensors detached, cloned in their layout, requiring
    grad as the originals do), then backward from every floating output when autograd records
    now: what a training step pays. The copies keep the caller's tensors and their gradients
    out of it."""
    copies = [_copy(a) for a in args]
    backward = autograd_records(args)

    def run() -> Any:
        with torch.enable_grad() if backward else torch.no_grad(), _own_saved_tensors():
            out = fn(*copies)
            if backward:
                outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                        if isinstance(o, torch.Tensor) and o.requires_grad]
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                for c in copies:
                    if isinstance(c, torch.Tensor):
                        c.grad = None
        return out

    return run


@contextlib.contextmanager
def _own_saved_tensors() -> Iterator[None]:
    """A measurement's run keeps the tensors its autograd saves as they are, out of any
    saved-tensor hooks in force around the call: a non-reentrant activation checkpoint
    (torch.utils.checkpoint's default) would otherwise take them for its own region's, and
    its recomputation, which knows the choice and measures nothing, would not match them."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_keep, _keep))
        except RuntimeError:  # hooks disabled here (disable_saved_tensors_hooks): none in force
            pass
        yield


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def autograd_records(args: Sequence[Any]) -> bool:
    """Whether autograd records an op on `args` now (then its backward is part of the cost)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)


def _copy(a: Any) -> Any:
    if not isinstance(a, torch.Tensor):
        return a
    return a.detach().clone().requires_grad_(a.requires_grad and a.is_floating_point())


def measurable(*tensors: torch.Tensor | None) -> bool:
    """Whether timing runs on these inputs mean anything: real tensors, outside tracing, and
    not while a CUDA graph is being captured (a measurement synchronises the device)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    real = [t for t in tensors if t is not None]
    if any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in real):
        return False
    return not (any(t.is_cuda for t in real) and torch.cuda.is_current_stream_capturing())


def made() -> list[Choice]:
    """The choices made in this process (and read from the choices file), oldest first."""
    with _lock:
        _load_file()
        return list(_choices.values())


def explain() -> str:
    """The choices made in this process (and read from the choices file), one line each."""
    made_now = made()
    lines = [f"attnkernels choices (mode: {current_mode()}; file: {os.environ.get(ENV_FILE) or 'none'})"]
    lines += [f"  {c.describe()}" for c in made_now] or ["  none made yet"]
    return "\n".join(lines)


def clear() -> None:
    """Forget every choice of this process (a choices file is read again at the next choice)."""
    global _file_loaded
    with _lock:
        _choices.clear()
        _answered.clear()
        _file_loaded = None


def machine() -> str:
    """What a measured choice is valid for: the CPU model, threads, torch version, the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {torch.get_num_threads()} threads; torch {torch.__version__}; {gpu}"


def _load_file() -> None:
    """Read the choices file's entries for this machine, once per path (caller holds _lock)."""
    global _file_loaded
    path = os.environ.get(ENV_FILE)
    if not path or _file_loaded == path:
        return
    _file_loaded = path
    try:
        entries = json.loads(Path(path).read_text()).get(machine(), {})
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError) as err:
        raise RuntimeError(f"attnkernels: {ENV_FILE}={path} is not a readable choices file ({err}); "
                           "delete it or point the variable elsewhere") from err
    for full_key, entry in entries.items():
        site, key = full_key.split("|", 1)
        _choices.setdefault(full_key, Choice(site, key, entry["winner"], "file", entry.get("times_ms", {})))


def _save_file() -> None:
    """Write this machine's choices into the choices file, keeping other machines' (caller holds _lock)."""
    path = os.environ.get(ENV_FILE)
    if not path:
        return
    target = Path(path)
    try:
        data = json.loads(target.read_text()) if target.is_file() else {}
    except ValueError:
        data = {}
    data[machine()] = {f"{c.site}|{c.key}": {"winner": c.winner, "times_ms": c.times_ms} for c in _choices.values()}
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(target)
