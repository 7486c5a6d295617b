"""Step-time helpers any layer may call: collectives (:mod:`sslseg.utils.distributed`), schedules
and the precision rule of ``amp="auto"`` (:mod:`sslseg.utils.precision`).

Only these rooms live here, so losses, inference and methods can use them without importing the
engine.
"""

from sslseg.utils.schedules import consistency_weight, poly_lr, sigmoid_rampup

__all__ = ["consistency_weight", "poly_lr", "sigmoid_rampup"]
