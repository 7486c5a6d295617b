"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslseg.data import Batch
from sslseg.losses.segmentation import softmax_mse_loss, supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["MeanTeacher", "teacher_noise"]


def teacher_noise(x: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """``x + clamp(std * N(0, 1), -clip, clip)``: the input noise of SSL4MIS's teachers."""
    if std == 0:
        return x
    return x + (torch.randn_like(x) * std).clamp_(-clip, clip)


@register_method("mean_teacher")
class MeanTeacher(SSLMethod):
    """Mean Teacher: a student and its exponential-moving-average teacher agree on unlabeled data.

    Paper: Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017.

    Loss: ``L = 0.5 (CE + Dice)(student(x_l), y_l) + lambda(t) * mean((softmax(student(x_u)) -
    softmax(teacher(x_u + noise)))^2)``; after each optimizer step the teacher follows the student
    by EMA with Mean Teacher's warm-up ``decay_t = min(1 - 1/(t+1), ema_decay)``.

    Differences from SSL4MIS (switches keep its behaviour available):
      * floating buffers (BatchNorm statistics) are averaged too (``ema_buffers``); SSL4MIS
        averages parameters only;
      * the consistency term is on from step 0; SSL4MIS-2D gates it off for t < 1000
        (``consistency_start=1000`` reproduces that).
    """

    @dataclass
    class Config(MethodConfig):
        ema_decay: float = 0.99
        consistency: float = 0.1
        noise_std: float = 0.1
        noise_clip: float = 0.2
        teacher_train_mode: bool = True
        ema_buffers: bool = True
        consistency_start: int = 0

    log_keys = ("loss_sup", "loss_cons")
    paper = "Tarvainen & Valpola, Mean teachers are better role models, NeurIPS 2017"

    def build(self) -> None:
        cfg = self.config
        self.nets["student"] = self.create_network()
        # SSL4MIS leaves the teacher in train mode (dropout and batch-statistics BN as noise).
        self.add_ema_teacher(decay=cfg.ema_decay, include_buffers=cfg.ema_buffers, train_mode=cfg.teacher_train_mode)

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        cfg = self.config
        student = self.nets["student"]
        logits = student(batch.images())
        logits_l, logits_u = split_labeled(logits, batch)
        loss_sup = supervised_loss(logits_l, batch.labeled_label)
        with torch.no_grad():
            target = torch.softmax(self.teachers["teacher"](teacher_noise(batch.unlabeled_image, cfg.noise_std, cfg.noise_clip)).float(), 1)
        loss_cons = softmax_mse_loss(logits_u, target)
        weight = ctx.consistency_weight if ctx.step >= cfg.consistency_start else 0.0
        loss = loss_sup + weight * loss_cons
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach()})
