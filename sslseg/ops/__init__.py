"""sslseg's custom operators: fused kernels with pure-PyTorch reference twins.

Each op lives in its own module (``sslseg/ops/<op>.py``) with a typed public wrapper, a fake
(meta) kernel for ``torch.compile``/``torch.export`` and a ``_reference`` twin used when the
compiled extension is absent (with a warning; an error under ``SSLSEG_REQUIRE_OPS=1``) or when the
user asks for it: ``SSLSEG_OPS=reference`` or :func:`set_backend` ``("reference")``;
:func:`backend` says which one runs.
"""

from sslseg.ops._loader import backend, build_info, has_ops, list_ops, missing_kernels, require_ops, set_backend
from sslseg.ops.edt import edt
from sslseg.ops.ema import ema_decay, ema_update_
from sslseg.ops.mc_uncertainty import mc_entropy_finalize_, mc_softmax_accumulate_, predictive_entropy
from sslseg.ops.sliding_window import sw_accumulate_, sw_gather

__all__ = ["backend", "build_info", "ema_decay", "ema_update_", "has_ops", "list_ops", "missing_kernels", "require_ops",
           "set_backend"]
__all__ += ["mc_entropy_finalize_", "mc_softmax_accumulate_", "predictive_entropy"]  # MC-dropout uncertainty
__all__ += ["sw_accumulate_", "sw_gather"]  # sliding-window inference
__all__ += ["edt"]  # exact Euclidean distance transform
