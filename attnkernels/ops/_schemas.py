"""The op schemas of each hot path, read from the one place they are written.

Every schema is written once, in C++: `csrc/<hot_path>_ops.cpp` defines the hot path's ops
with `m.def("...")` inside `TORCH_LIBRARY_FRAGMENT(attnkernels, m)`. The Triton backend
registers the same schemas under its own namespace, and the tests compare against them, by
reading that file (it ships with the package: the JIT build needs it too).
"""
from __future__ import annotations

import functools
import re

from .._build import source_root

# One `m.def(...)`: its adjacent string literals, concatenated, are the schema.
_DEF = re.compile(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", re.S)
_LITERAL = re.compile(r"\"([^\"]*)\"")


@functools.lru_cache(maxsize=None)
def schemas(hot_path: str) -> dict[str, str]:
    """{op name: schema} of `hot_path`'s ops, in the order csrc/<hot_path>_ops.cpp defines them.

    The schema text has no namespace (`channel_pool(Tensor x) -> (Tensor avg, Tensor max)`).
    """
    path = source_root() / f"{hot_path}_ops.cpp"
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"attnkernels: the schemas of hot path {hot_path!r} are missing ({path})") from err
    found = {}
    for literals in _DEF.findall(text):
        schema = "".join(_LITERAL.findall(literals))
        found[schema.split("(", 1)[0]] = schema
    if not found:
        raise RuntimeError(f"attnkernels: {path} defines no op (expected m.def(\"...\") lines)")
    return found
