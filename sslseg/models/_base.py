"""The output contract every segmentation network follows.

* ``forward(x)`` takes ``(B, in_channels, *spatial)`` and returns the main logits
  ``(B, num_classes, *spatial)`` at the input resolution. Nothing else, in train and eval mode, so
  that the trained student exports as it is.
* ``forward_all(x)`` returns a dict with the main logits and the auxiliary outputs the network has
  (the keys are listed in ``model.output_keys``):

  ``"logits"``
      The main logits, exactly what ``forward`` returns.
  ``"aux"``
      A list of auxiliary logits, each ``(B, num_classes, *spatial)`` at the input resolution
      (deep-supervision heads, URPC pyramid heads, CCT auxiliary decoders), ordered as each network
      documents (finest scale first for pyramids).
  ``"sdf"``
      A signed-distance regression map in ``[-1, 1]`` (``tanh``), ``(B, sdf_channels, *spatial)``
      (``vnet_sdf``, for DTC).

* Perturbations that exist only for training (URPC/CCT feature noise, feature dropout, dropout,
  stochastic depth) run only in training mode; in eval mode every output is deterministic.
* Geometry attributes: ``dim`` (2 or 3), ``size_divisor`` (a tuple, one entry per spatial axis:
  each input size must be a multiple of it), ``input_size`` (``None``, or the one spatial size a
  network with a fixed resolution such as Swin-UNet accepts), ``in_channels``, ``num_classes``.
  Inputs that do not fit raise a ``ValueError`` (``torch.jit.Error`` once scripted) that says which
  size would fit.
"""

# No `from __future__ import annotations` here: TorchScript reads the class-level attribute
# annotations below and cannot resolve them from strings.
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

__all__ = ["ModelOutputs", "SegmentationModel", "check_input"]

#: What ``forward_all`` returns: ``"logits"`` -> Tensor, ``"aux"`` -> list of Tensors, ``"sdf"`` -> Tensor.
ModelOutputs = Dict[str, Union[Tensor, List[Tensor]]]


def check_input(
    x: Tensor, model: str, dim: int, in_channels: int, size_divisor: List[int], fixed_size: List[int]
) -> None:
    """Raise a ``ValueError`` naming the expectation if ``x`` does not fit a network.

    Scriptable and traceable: under ``torch.export`` / ONNX export with static shapes the checks
    are resolved at trace time and leave nothing in the graph.

    Args:
        x: The input, expected ``(B, in_channels, *spatial)`` with ``dim`` spatial axes.
        model: Name used in the message.
        dim: Number of spatial axes.
        in_channels: Expected channel count.
        size_divisor: Per-axis divisor every spatial size must be a multiple of.
        fixed_size: Empty, or the exact spatial size required.
    """
    if x.dim() != dim + 2:
        raise ValueError(
            f"{model}: input must have shape (B, C, {'H, W' if dim == 2 else 'D, H, W'}) "
            f"with {dim} spatial axes, got shape {list(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(f"{model}: input must have {in_channels} channel(s) on axis 1, got shape {list(x.shape)}")
    spatial = list(x.shape[2:])
    if len(fixed_size) > 0:
        if spatial != fixed_size:
            raise ValueError(
                f"{model}: this network was built for spatial size {fixed_size} (option img_size) "
                f"and accepts only that size, got {spatial}; rebuild it with img_size={spatial} "
                f"(any multiple of {size_divisor} works) or resize the input"
            )
        return
    for i in range(dim):
        if spatial[i] % size_divisor[i] != 0 or spatial[i] == 0:
            fitting = [((s + d - 1) // d) * d if s > 0 else d for s, d in zip(spatial, size_divisor)]
            raise ValueError(
                f"{model}: each spatial size must be a positive multiple of {size_divisor} "
                f"(the network downsamples by that much), got spatial size {spatial}; "
                f"pad the input, e.g. to {fitting}"
            )


class SegmentationModel(nn.Module):
    """Base class of the segmentation networks: the output contract and the geometry attributes.

    Subclasses call ``super().__init__(...)`` with their geometry, implement ``forward`` and, when
    they have auxiliary outputs, ``forward_all``. See the module docstring for the contract.

    Args:
        dim: Spatial dimensions, 2 or 3.
        in_channels: Input channels.
        num_classes: Output channels of the main logits.
        size_divisor: Per-axis divisor each input size must be a multiple of (an int applies to
            every axis).
        input_size: The only spatial size accepted, for networks with a fixed resolution.
        output_keys: The keys ``forward_all`` returns.
    """

    _divisor: List[int]
    _fixed_size: List[int]

    def __init__(
        self,
        *,
        dim: int,
        in_channels: int,
        num_classes: int,
        size_divisor: Union[int, Sequence[int]] = 1,
        input_size: Optional[Sequence[int]] = None,
        output_keys: Sequence[str] = ("logits",),
    ) -> None:
        super().__init__()
        if isinstance(size_divisor, int):
            size_divisor = (size_divisor,) * dim
        self.dim: int = dim
        self.in_channels: int = in_channels
        self.num_classes: int = num_classes
        self.size_divisor: Tuple[int, ...] = tuple(int(d) for d in size_divisor)
        self.input_size: Optional[Tuple[int, ...]] = None if input_size is None else tuple(int(s) for s in input_size)
        self.output_keys: Tuple[str, ...] = tuple(output_keys)
        self._divisor = [int(d) for d in size_divisor]
        self._fixed_size = [] if input_size is None else [int(s) for s in input_size]
        self._model_name: str = type(self).__name__

    def check_input(self, x: Tensor) -> None:
        """Raise a ``ValueError`` if ``x`` is not ``(B, in_channels, *spatial)`` with a supported size."""
        check_input(x, self._model_name, self.dim, self.in_channels, self._divisor, self._fixed_size)

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Main logits ``(B, num_classes, *spatial)`` at the input resolution."""
        raise NotImplementedError

    def forward_all(self, x: Tensor) -> ModelOutputs:
        """Main logits and auxiliary outputs; see the module docstring for the keys."""
        return {"logits": self.forward(x)}
