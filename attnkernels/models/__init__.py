"""Backbones with an `attention=` argument: one attention module in every block.

Every model function has the signature
`f(num_classes, attention=None, attention_kwargs=None) -> nn.Module`. `attention` is a
name from `attnkernels.reference.create` ("se", "eca", "cbam", "ham", "gam", "pam", "cam",
"csm", "softmax_spatial", "bridge", "bam", "triplet", "criss_cross"); the module sits on
each block's output, before the residual add where there is one, sized to the block's
output channels. "bridge" also receives the block's intermediate maps (BA-Net).
`attention=None` gives the plain network, parameter for parameter.

ImageNet layout (224x224 inputs, 1000 classes): resnet18/34/50/101, mobilenet_v2.
CIFAR layout (32x32 inputs, 10 classes): resnet20/32/56/110, wide_resnet16_8, resnext29_8x64d.
"""
from .cifar_resnet import resnet20, resnet32, resnet56, resnet110
from .mobilenet_v2 import mobilenet_v2
from .resnet import resnet18, resnet34, resnet50, resnet101
from .resnext import resnext29_8x64d
from .wide_resnet import wide_resnet16_8

__all__ = [
    "mobilenet_v2",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet50",
    "resnet56",
    "resnet101",
    "resnet110",
    "resnext29_8x64d",
    "wide_resnet16_8",
]
