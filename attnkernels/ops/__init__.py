"""torch.library registration, one module per hot path (fake impls and autograd)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def register_once(
    namespace: str,
    with_fakes: bool,
    fakes: dict[str, Callable],
    register_autograd: Callable[[str], None],
    registered: set[str],
) -> None:
    """Give `namespace`'s ops of one hot path their autograd and, `with_fakes`, their fake
    impls, once per namespace (`registered` remembers which). Triton ops
    (torch.library.triton_op) trace their own fake implementation: `with_fakes=False`."""
    if namespace in registered:
        return
    if with_fakes:
        for name, fake in fakes.items():
            torch.library.register_fake(f"{namespace}::{name}")(fake)
    register_autograd(namespace)
    registered.add(namespace)
