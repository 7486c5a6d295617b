"""Inference: sliding-window blending of window predictions, and 2D networks on 3D volumes.

``sliding_window`` equals MONAI's ``sliding_window_inference`` for the same arguments (and offers
SSL4MIS's stride grid and a streaming, slab-by-slab output); ``predict_slicewise`` runs a 2D network
slice by slice.
"""

from sslseg.inference.sliding import (
    SlidingWindowGrid,
    clear_cache,
    importance_map,
    sliding_window,
    window_grid,
)
from sslseg.inference.slicewise import predict_slicewise
from sslseg.inference.predict import predict_volume
from sslseg.inference.files import infer

__all__ = ["SlidingWindowGrid", "clear_cache", "importance_map", "infer", "predict_slicewise", "predict_volume", "sliding_window", "window_grid"]
