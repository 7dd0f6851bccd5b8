"""Environment variables read on the per-call path (the backend, choice mode and memory budget).

`os.environ.get` of an unset name costs about 1 us: `os.environ` is a Mapping whose `get`
raises and catches a KeyError. The fused modules read two or three such names per call, and a
network's modules run with their host code out of the CPU caches, where each microsecond of
it costs several (benchmarks/NOTES.md, sessions 31 and 32). `setting` reads the same mapping
without the exception: about 60 ns.
"""
from __future__ import annotations

import os

# CPython keeps os.environ's contents in `_data` (encoded keys and values) and converts with
# `encodekey` / `decodevalue`; every change made through os.environ (assignment, del, update,
# pytest's monkeypatch.setenv) lands there, and os.putenv alone reaches neither lookup.
# Where these are missing, the public lookup.
_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_DECODE = getattr(os.environ, "decodevalue", None)
_FAST = isinstance(_DATA, dict) and callable(_ENCODE) and callable(_DECODE)
_KEYS: dict[str, object] = {}


def setting(name: str) -> str | None:
    """`os.environ.get(name)`: the variable's value, or None when it is unset."""
    if not _FAST:
        return os.environ.get(name)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = _ENCODE(name)
    value = _DATA.get(key)
    return None if value is None else _DECODE(value)
