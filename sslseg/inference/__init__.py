"""Inference, tensors in and tensors out: sliding-window blending, 2D networks on 3D volumes.

``sliding_window`` equals MONAI's ``sliding_window_inference`` for the same arguments (and offers
SSL4MIS's stride grid and a streaming, slab-by-slab output); ``predict_slicewise`` runs a 2D network
slice by slice; ``predict_volume`` picks between them for one volume (and applies a model's ``Preprocessing``:
its plan's crop, normalisation and resampling, mapped back); ``InferencePipeline`` is the
same inference as one scriptable module. Reading and writing scan files is the user-facing
layer's (:func:`sslseg.infer`, :mod:`sslseg.app.infer`).
"""

from sslseg.inference.sliding import (
    SlidingWindowGrid,
    clear_cache,
    importance_map,
    sliding_window,
    window_grid,
)
from sslseg.inference.slicewise import predict_slicewise
from sslseg.inference.preprocessing import Prepared, Preprocessing
from sslseg.inference.predict import predict_volume
from sslseg.inference.pipeline import InferencePipeline

__all__ = ["InferencePipeline", "Prepared", "Preprocessing", "SlidingWindowGrid", "clear_cache", "importance_map", "predict_slicewise", "predict_volume",
           "sliding_window", "window_grid"]
