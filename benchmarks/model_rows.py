"""Whole-model rows of the throughput table: ResNet-50 with an attention module vs bare ResNet-50.

For each attention name given with ``throughput.py --models`` this builds
``attnkernels.models.resnet50(attention=name)`` and times one *training step* of it:
forward in ``train()`` mode, cross-entropy against fixed random labels, backward, every
``.grad`` set to None after the step (no optimizer step: the SGD update is the same for every
variant and would only dilute the difference). The variants of one attention name are

* ``eager``     - the model as built (the reference attention modules);
* ``compile``   - ``torch.compile(model, dynamic=False)`` of that same model object;
* ``fused-<b>`` - a copy of the model (same initial weights) with every attention module
  swapped for its fused version by ``attnkernels.fuse(model, backend=b, tails=False)``; only
  for attention names with a fused class (``attnkernels.nn.FUSED``) whose hot paths backend b
  runs on the device;
* ``tail-<b>``  - a copy with the blocks' tails fused too (``attnkernels.fuse(model,
  backend=b)``: BatchNorm, the gates, the residual add and the ReLU as the block_tail ops, or
  the spatial_tail ops for CBAM and HAM);
  for the bare network and the attentions whose blocks get a fused tail (TAIL_ATTENTIONS),
  for each backend b of a ``fused-<b>`` variant that runs their hot paths.

plus the bare ``resnet50()`` (attention ``none``): its ``eager`` row per run, timed in the
same interleaved rounds as every other model, so each row's overhead over the bare network
(``step / bare step - 1``) compares times taken side by side.

Precision: on CUDA the step runs under ``torch.autocast(bfloat16)`` with the model and the
images in ``channels_last`` (fp32 weights; the usual mixed-precision training setup); on
CPU in fp32, NCHW. ``--dtype`` applies to the module rows only.

This module holds what is specific to the models (settings, building, the step, the row
and its table columns); the harness (``benchmarks/harness/``) times the steps with its
interleaved rounds (``timing.run_phase``) and timers, and prints and writes the rows. It
imports nothing from ``throughput.py`` (only ``harness.backends`` and ``harness.table``, with
``benchmarks/`` on ``sys.path``), so it loads the same way whether that runs as a script or
is imported by a test.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, fields
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attnkernels.models import resnet50
from attnkernels.nn import FUSED, as_fused, fused_class
from harness.backends import fused_backends, fused_hot_paths
from harness.table import column_headers

#: The model's name in the rows (the only model measured so far).
MODEL = "resnet50"
NUM_CLASSES = 1000
#: The ``attention`` of the bare network's row.
BARE = "none"

# CPU: no model rows unless asked for (a ResNet-50 training step at batch 8, 224x224 takes
# seconds on 2 cores, and the default `make bench` must stay quick). CUDA: the modules with
# fused versions.
DEFAULT_MODELS: Dict[str, str] = {"cpu": BARE, "cuda": ",".join(FUSED)}
DEFAULT_MODEL_BATCH: Dict[str, int] = {"cpu": 8, "cuda": 64}
DEFAULT_MODEL_REPEATS: Dict[str, int] = {"cpu": 3, "cuda": 20}
DEFAULT_MODEL_SIZE = 224


@dataclass
class ModelSettings:
    """The model rows' part of a run's settings."""

    attentions: List[str]
    variants: List[str]
    batch: int
    size: int
    repeats: int
    device: torch.device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        return "bfloat16 autocast" if self.cuda else "float32"

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.cuda else "contiguous"


def resolve_models(text: Optional[str], known: Sequence[str], device: torch.device) -> List[str]:
    """``--models`` -> attention names (``[]`` for none / empty); ``ValueError`` on unknown ones."""
    text = DEFAULT_MODELS[device.type] if text is None else text
    lowered = text.strip().lower()
    if lowered in ("", BARE):
        return []
    items = list(known) if lowered == "all" else [m.strip() for m in lowered.split(",") if m.strip()]
    unknown = [m for m in items if m not in known]
    if unknown:
        raise ValueError(f"unknown --models name(s) {unknown}; choose from {', '.join(known)}, or none")
    return list(dict.fromkeys(items))


def model_variants(variants: Sequence[str], device: torch.device, explicit: bool) -> List[str]:
    """The model variants from the run's ``--variants``: always ``eager``; ``compile`` when it
    is asked for, except on CPU by default (compiling ResNet-50's forward and backward takes
    minutes there: pass ``--variants`` naming compile to get it); every ``fused-*`` one. No
    memcpy: it has no meaning for a model."""
    out = ["eager"]
    if "compile" in variants and (explicit or device.type == "cuda"):
        out.append("compile")
    out += [v for v in variants if v.startswith("fused-")]
    return out


#: The attentions whose blocks `attnkernels.fuse` gives a fused tail (attnkernels.nn.block_tail),
#: and the hot path that tail runs.
TAIL_HOT_PATH = {BARE: "block_tail", "se": "block_tail", "eca": "block_tail", "cbam": "spatial_tail",
                 "ham": "spatial_tail"}
TAIL_ATTENTIONS = tuple(TAIL_HOT_PATH)


def variants_of(attention: str, settings: ModelSettings) -> List[str]:
    """The variants measured for one attention name (the bare network: eager, and its fused
    tails); a ``fused-<b>`` one only where backend b runs every hot path of the attention's
    fused class on the device, a ``tail-<b>`` one where b also runs the tail's hot path
    (``harness/backends.py``, the one place that decides it)."""
    wanted = [v[len("fused-"):] for v in settings.variants if v.startswith("fused-")]
    paths = () if attention == BARE else fused_hot_paths(attention)
    runs = [] if paths is None else fused_backends(paths, settings.device, wanted)
    out = ["eager"] if attention == BARE else [
        v for v in settings.variants if not v.startswith("fused-") or v[len("fused-"):] in runs]
    if attention in TAIL_ATTENTIONS and paths is not None:
        tail_paths = (*paths, TAIL_HOT_PATH[attention])
        out += [f"tail-{b}" for b in fused_backends(tail_paths, settings.device, wanted)]
    return out


def label(attention: str, variant: str) -> str:
    """The key of one model variant in the timed phase."""
    return f"{attention}/{variant}"


# --------------------------------------------------------------------------- building


def fuse_model(model: nn.Module, backend_name: str, tails: bool = False) -> nn.Module:
    """``model`` with every attention module that has a fused version swapped for it, and with
    ``tails`` the blocks' tails fused, pinned to ``backend_name``: ``attnkernels.fuse`` where it
    exists, else the module swap by hand (``attnkernels.nn.as_fused`` on each module
    ``fused_class`` knows)."""
    try:
        from attnkernels import fuse
    except ImportError:
        fuse = None
    if fuse is not None:
        return fuse(model, backend=backend_name, tails=tails)
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if child is not None and fused_class(child) is not None:
                fused = as_fused(child)
                fused.backend = backend_name
                setattr(parent, attr, fused)
    return model


def build_reference(attention: str, settings: ModelSettings) -> nn.Module:
    """``resnet50(attention=...)`` (None for the bare network) on the device, in train mode,
    channels_last on CUDA."""
    model = resnet50(NUM_CLASSES, attention=None if attention == BARE else attention)
    model = model.to(settings.device)
    if settings.cuda:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def build_variant(variant: str, reference: nn.Module) -> nn.Module:
    """The model a variant runs: the reference itself, its compiled form, or a fused copy."""
    if variant == "eager":
        return reference
    if variant == "compile":
        return torch.compile(reference, dynamic=False)
    if variant.startswith("fused-"):
        return fuse_model(copy.deepcopy(reference), variant[len("fused-"):])
    if variant.startswith("tail-"):
        return fuse_model(copy.deepcopy(reference), variant[len("tail-"):], tails=True)
    raise ValueError(f"unknown model variant {variant!r}")


def make_batch(settings: ModelSettings) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random images (N, 3, S, S), channels_last on CUDA, and random labels (N,)."""
    n, s = settings.batch, settings.size
    images = torch.randn(n, 3, s, s, device=settings.device)
    if settings.cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (n,), device=settings.device)
    return images, labels


def autocast(settings: ModelSettings) -> ContextManager[Any]:
    """bf16 autocast on CUDA; nothing on CPU."""
    if settings.cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(
    model: Callable[[torch.Tensor], torch.Tensor],
    params: Sequence[torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: ModelSettings,
) -> Callable[[], torch.Tensor]:
    """One training step without the optimizer: forward (autocast on CUDA), cross-entropy,
    backward, then every ``.grad`` set to None (as ``zero_grad()`` does), so a step leaves
    nothing behind. Returns the (detached) loss."""

    def step() -> torch.Tensor:
        with autocast(settings):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        for p in params:
            p.grad = None
        return loss.detach()

    return step


def build_steps(
    settings: ModelSettings, on_error: Callable[[str, BaseException], None]
) -> Dict[str, Callable[[], torch.Tensor]]:
    """The training step of every (attention, variant), keyed by :func:`label`, in table
    order: the bare network first. A model or variant that cannot be built is reported to
    ``on_error(label, error)`` and left out."""
    torch.manual_seed(0)
    images, labels = make_batch(settings)
    steps: Dict[str, Callable[[], torch.Tensor]] = {}
    for attention in [BARE, *settings.attentions]:
        try:
            reference = build_reference(attention, settings)
        except Exception as err:  # e.g. a module whose constructor rejects a channel count
            for variant in variants_of(attention, settings):
                on_error(label(attention, variant), err)
            continue
        for variant in variants_of(attention, settings):
            try:
                model = build_variant(variant, reference)
                params = [p for p in model.parameters() if p.requires_grad]
                steps[label(attention, variant)] = training_step(model, params, images, labels, settings)
            except Exception as err:
                on_error(label(attention, variant), err)
    return steps


# --------------------------------------------------------------------------- rows


@dataclass
class ModelRow:
    """One (attention, variant) model result; the fields are the CSV columns, in order."""

    model: str
    attention: str
    variant: str
    batch: int
    image_size: int
    precision: str
    memory_format: str
    device: str
    step_ms: Optional[float] = None
    images_per_s: Optional[float] = None
    overhead_vs_bare_pct: Optional[float] = None
    speedup_vs_eager: Optional[float] = None
    peak_step_mb: Optional[float] = None
    first_call_s: Optional[float] = None
    error: str = ""


#: CSV columns of ``throughput_models.csv``, in order.
MODEL_COLUMNS: Tuple[str, ...] = tuple(f.name for f in fields(ModelRow))

# (header, row field, width, format) of the printed model table.
MODEL_TABLE: Tuple[Tuple[str, str, int, str], ...] = (
    ("attention", "attention", 15, "s"),
    ("variant", "variant", 11, "s"),
    ("ms/step", "step_ms", 10, ".1f"),
    ("img/s", "images_per_s", 9, ".1f"),
    ("vs bare %", "overhead_vs_bare_pct", 10, ".1f"),
    ("spd", "speedup_vs_eager", 6, ".2f"),
    ("pk step MB", "peak_step_mb", 11, ".1f"),
)


def make_rows(
    results: Dict[str, Any], settings: ModelSettings, mib: float = 1024.0 * 1024.0
) -> List[ModelRow]:
    """Rows from the phase results (``harness.timing.PhaseResult``s keyed by :func:`label`):
    images/s, overhead over the bare network and speed-up over the same attention's eager
    model filled in. Every expected (attention, variant) gets a row, in table order."""

    def median(key: str) -> Optional[float]:
        result = results.get(key)
        return None if result is None else result.median_ms

    bare_ms = median(label(BARE, "eager"))
    rows = []
    for attention in [BARE, *settings.attentions]:
        eager_ms = median(label(attention, "eager"))
        for variant in variants_of(attention, settings):
            key = label(attention, variant)
            result = results.get(key)
            ms = median(key)
            ok = result is not None and result.error is None
            rows.append(
                ModelRow(
                    model=MODEL,
                    attention=attention,
                    variant=variant,
                    batch=settings.batch,
                    image_size=settings.size,
                    precision=settings.precision,
                    memory_format=settings.memory_format,
                    device=str(settings.device),
                    step_ms=ms,
                    images_per_s=None if not ms else settings.batch / (ms / 1e3),
                    overhead_vs_bare_pct=None if not (ms and bare_ms) else (ms / bare_ms - 1.0) * 100.0,
                    speedup_vs_eager=None if not (ms and eager_ms) else eager_ms / ms,
                    peak_step_mb=(
                        result.peak_bytes / mib if ok and result.peak_bytes is not None else None
                    ),
                    first_call_s=result.first_call_s if result is not None else None,
                    error=(result.error or "") if result is not None else "not measured",
                )
            )
    return rows


def table_header(settings: ModelSettings) -> str:
    """Title lines and column headers of the printed model table."""
    layout = "channels_last" if settings.cuda else "NCHW"
    title = (
        f"whole model: {MODEL} training step | batch {settings.batch} | "
        f"{settings.size}x{settings.size} | {settings.precision}, {layout} | "
        f"median of {settings.repeats} interleaved rounds"
    )
    legend = (
        "step: train() forward + cross-entropy + backward, grads set to None, no optimizer step; "
        "vs bare: step / bare resnet50 step - 1; spd: same attention's eager step / step; "
        "pk: peak memory of one step above the start"
    )
    cols = column_headers(MODEL_TABLE)
    return "\n".join([title, legend, cols, "-" * len(cols)])


def settings_metadata(settings: ModelSettings) -> Dict[str, Any]:
    """The model rows' settings, for the JSON document's metadata."""
    return {
        "model": MODEL,
        "attentions": settings.attentions,
        "variants": settings.variants,
        "batch": settings.batch,
        "image_size": settings.size,
        "repeats": settings.repeats,
        "precision": settings.precision,
        "memory_format": settings.memory_format,
        "step": "train(), forward + cross-entropy on random labels + backward, grads set to None, no optimizer step",
    }
