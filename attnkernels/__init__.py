"""attnkernels: fused kernels for the attention modules of convolutional networks.

`attnkernels.reference` holds the pure-PyTorch modules that define the math (docs/contract.md);
`attnkernels.nn` the fused modules with the same constructors and weights;
`attnkernels.functional` the fused ops, run on the backend `attnkernels.backend` picks;
`attnkernels.choose` how a backend's algorithm is chosen where the machine and shape decide
(measured the first time a shape is seen), and `attnkernels.budget` the memory such a choice
may keep beyond its op's;
`attnkernels.models` backbones that take an `attention=` argument; `fuse(model)` swaps a
model's attention modules for the fused ones in place (`unfuse` goes back);
`attnkernels.export` how fused models trace and export (ONNX included). Importing
builds nothing: the compiled ops build on first use.
"""
from . import backend, budget, choose, export, functional, models, nn, reference
from .convert import FuseReport, fuse, unfuse
from .reference import create

__version__ = "0.1.0"

__all__ = [
    "backend", "budget", "choose", "export", "functional", "models", "nn", "reference",
    "create", "fuse", "unfuse", "FuseReport", "__version__",
]
