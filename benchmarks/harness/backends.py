"""Which fused backends run a module here: the one place the benchmarks decide it.

A fused class of ``attnkernels.nn.FUSED`` names the hot paths its forward runs
(``hot_paths``, e.g. ECA ``("channel_gate",)``, GAM ``("gam_channel", "shuffle_conv")``); a
backend runs the module on a device iff ``attnkernels.backend.why_unavailable(backend, path,
device)`` is None for every one of them. The module table's rows, its default variants, the
whole-model rows (``model_rows.py``) and the pytest-benchmark files (``_bench_common.py``)
all ask :func:`backend_problems` / :func:`fused_backends`.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch

from attnkernels import backend
from attnkernels.nn import FUSED

#: The fused backends the tables can time, in column order.
FUSED_BACKENDS: Sequence[str] = ("cpu", "cuda", "triton")


def default_candidates(device: torch.device | str) -> List[str]:
    """The backends worth timing by default on ``device``: all but Triton on CPU, which is
    Triton's interpreter, a test tool (``--variants fused-triton`` still asks for it)."""
    device = torch.device(device)
    return [b for b in FUSED_BACKENDS if not (b == "triton" and device.type == "cpu")]


def backend_problems(
    hot_paths: Iterable[str], device: torch.device | str, candidates: Optional[Sequence[str]] = None
) -> Dict[str, Optional[str]]:
    """``{backend: None}`` for each candidate that runs every one of ``hot_paths`` on
    ``device``, ``{backend: "<hot path>: <why not>"}`` for the others. ``candidates``
    defaults to :func:`default_candidates`; no hot paths (no fused version): every one
    runs nothing, so the caller passes ``()`` only for modules that have one."""
    device = torch.device(device)
    paths = tuple(hot_paths)
    problems: Dict[str, Optional[str]] = {}
    for name in default_candidates(device) if candidates is None else candidates:
        problems[name] = None
        for path in paths:
            why = backend.why_unavailable(name, path, device)  # looked up now: tests patch it
            if why is not None:
                problems[name] = f"{path}: {why}"
                break
    return problems


def fused_backends(
    hot_paths: Iterable[str], device: torch.device | str, candidates: Optional[Sequence[str]] = None
) -> List[str]:
    """The candidates (see :func:`backend_problems`) that run all of ``hot_paths`` on ``device``."""
    return [b for b, why in backend_problems(hot_paths, device, candidates).items() if why is None]


def fused_hot_paths(registry_name: str) -> Optional[Sequence[str]]:
    """The hot paths of the fused class of a registry name, or None if it has none yet."""
    cls = FUSED.get(registry_name)
    return None if cls is None else tuple(cls.hot_paths)


def module_backends(
    registry_name: str, device: torch.device | str, candidates: Optional[Sequence[str]] = None
) -> Dict[str, Optional[str]]:
    """:func:`backend_problems` for a registry module's fused class (``{}`` without one)."""
    paths = fused_hot_paths(registry_name)
    return {} if paths is None else backend_problems(paths, device, candidates)


def available_anywhere(device: torch.device | str, candidates: Optional[Sequence[str]] = None) -> List[str]:
    """The candidates that run at least one fused module on ``device``, in column order."""
    runs = {b for name in FUSED for b, why in module_backends(name, device, candidates).items() if why is None}
    return [b for b in (default_candidates(device) if candidates is None else candidates) if b in runs]
