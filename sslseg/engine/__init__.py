"""The training engine: one loop for every method (``sslseg.fit``), schedules, checkpoints, runs."""

from sslseg.engine.config import EngineConfig
from sslseg.engine.loop import Trainer, fit
from sslseg.engine.run import Run, load_model
from sslseg.utils.schedules import consistency_weight, poly_lr, sigmoid_rampup

__all__ = ["EngineConfig", "Run", "Trainer", "consistency_weight", "fit", "load_model", "poly_lr", "sigmoid_rampup"]
