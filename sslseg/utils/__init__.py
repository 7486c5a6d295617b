"""Step-time helpers any layer may call: collectives (:mod:`sslseg.utils.distributed`) and schedules.

Only these two rooms live here, so losses and methods can use them without importing the engine.
"""

from sslseg.utils.schedules import consistency_weight, poly_lr, sigmoid_rampup

__all__ = ["consistency_weight", "poly_lr", "sigmoid_rampup"]
