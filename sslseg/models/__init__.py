"""Segmentation backbones and discriminators, 2D and 3D, behind one registry.

>>> from sslseg.models import create_model, list_models
>>> net = create_model("unet_3d", in_channels=1, num_classes=2, seed=0)
>>> net.dim, net.size_divisor
(3, (16, 16, 16))

Every segmentation network follows one output contract (:mod:`sslseg.models._base`):
``forward(x)`` returns only the main logits ``(B, num_classes, *spatial)`` at the input resolution;
``forward_all(x)`` returns ``{"logits": ..., "aux": [...], "sdf": ...}`` with the keys listed in
``net.output_keys``; training-only perturbations are off in eval mode. Discriminators
(``list_models(task="discriminator")``) take ``forward(probs, image)`` and return ``(B, 2)`` logits.
All networks are built from stock layers and pass ``torch.jit.script``, ``torch.export`` and ONNX
export (checked against onnxruntime) in the test suite.

Initialisation is reproducible: pass ``seed=`` to :func:`create_model` (leaves the global RNG
alone) or call ``torch.manual_seed`` before it.
"""

from ._base import ModelOutputs, SegmentationModel
from ._registry import ModelInfo, create_model, list_models, model_info, register_model

# Importing the network modules registers them.
from . import (  # noqa: E402,F401  (isort: skip)
    attention_unet,
    discriminator,
    efficient_unet,
    enet,
    nnunet,
    pnet,
    swin_unet,
    unet,
    unet_3d,
    vnet,
    voxresnet,
)
from .discriminator import Discriminator

__all__ = [
    "Discriminator",
    "ModelInfo",
    "ModelOutputs",
    "SegmentationModel",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]
