"""How much memory an algorithm may keep for the backward beyond what its op saves.

Some choices trade memory for time: GAM's last conv can save its output z for the backward
(a full-size map) instead of recomputing it there (one more conv). `attnkernels.choose`
measures such a candidate only when this budget allows its extra bytes, so a user short of
memory keeps the recomputing kernels however fast saving would be.

The limit, per op call, in bytes: the innermost `with budget.extra_memory(limit):` block, else
`ATTNKERNELS_EXTRA_MEMORY` (an integer with an optional K, M or G suffix, powers of 1024;
"unlimited"), else unlimited. 0 never keeps anything extra.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from ._env import setting

ENV_VAR = "ATTNKERNELS_EXTRA_MEMORY"
UNLIMITED = "unlimited"
_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}

# The block's limit; the _UNSET default defers to the environment.
_UNSET = object()
_limit: contextvars.ContextVar[object] = contextvars.ContextVar("attnkernels_extra_memory", default=_UNSET)


@contextlib.contextmanager
def extra_memory(limit: int | str | None) -> Iterator[None]:
    """In this block, allow `limit` extra bytes per op call (an int, a string as the
    environment variable takes, or None for unlimited)."""
    token = _limit.set(_parse(limit, "budget.extra_memory(limit)"))
    try:
        yield
    finally:
        _limit.reset(token)


def extra_memory_limit() -> int | None:
    """The limit in force, in bytes, or None for unlimited."""
    value = _limit.get()
    if value is _UNSET:
        return _parse(setting(ENV_VAR), ENV_VAR)
    return value  # type: ignore[return-value]


def allows(extra_bytes: int) -> bool:
    """Whether an algorithm that keeps `extra_bytes` more than its op may run."""
    limit = extra_memory_limit()
    return limit is None or extra_bytes <= limit


# As attnkernels.backend.select: dynamo calls it while tracing and keeps the answer as a
# constant, rather than tracing the environment lookup.
allows._dynamo_marked_constant = True


def _parse(value: int | str | None, where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", UNLIMITED)):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        number, scale = value, 1
    else:
        text = str(value).strip().upper()
        suffix = text[-1] if text and text[-1] in _SUFFIXES else ""
        digits = text[: len(text) - len(suffix)]
        if not digits.isdigit():
            raise ValueError(f"attnkernels: {where} must be a byte count (e.g. 0, 512M, 2G) or {UNLIMITED!r}; "
                             f"got {value!r}")
        number, scale = int(digits), _SUFFIXES[suffix]
    if number < 0:
        raise ValueError(f"attnkernels: {where} must not be negative; got {value!r}")
    return number * scale
