"""attnkernels: fused kernels for the attention modules of convolutional networks.

`attnkernels.reference` holds the pure-PyTorch modules that define the math (SPEC.md);
`attnkernels.models` holds backbones that take an `attention=` argument.
"""
from . import models, reference
from .reference import create

__version__ = "0.1.0"

__all__ = ["reference", "models", "create", "__version__"]
