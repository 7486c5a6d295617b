"""Deep Adversarial Networks (Zhang et al., MICCAI 2017): a segmenter and a discriminator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["AdversarialNetwork", "discriminator_targets"]

#: Discriminator classes: the segmentation of an annotated image is "labeled" (1), else "unlabeled" (0).
LABELED, UNLABELED = 1, 0


def discriminator_targets(n_labeled: int, n_unlabeled: int, device: torch.device | str | None = None) -> Tensor:
    """``[1] * n_labeled + [0] * n_unlabeled`` as int64: the discriminator's targets for a batch."""
    return torch.cat([torch.full((n_labeled,), LABELED, dtype=torch.long, device=device),
                      torch.full((n_unlabeled,), UNLABELED, dtype=torch.long, device=device)])


@register_method("adversarial")
class AdversarialNetwork(SSLMethod):
    """DAN: unlabeled segmentations are trained to fool a discriminator that tells them from labeled ones.

    Paper: Zhang et al., "Deep Adversarial Networks for Biomedical Image
    Segmentation Utilizing Unannotated Images", MICCAI 2017.

    Networks: the segmenter ``nets["student"]`` (trained by the engine's SGD) and a discriminator
    ``nets["discriminator"]`` (``discriminator`` / ``discriminator_3d`` from the model registry)
    that sees a softmax map with its image and outputs 2 logits (1 = "segmentation of a labeled
    image", 0 = "of an unlabeled image"). The discriminator has its own Adam optimizer
    (``extra_optimizers()``, lr ``discriminator_lr``, betas ``discriminator_betas``, constant lr).

    Each iteration:

    1. Segmenter step (``step``; discriminator in eval mode, so without dropout)::

           z = S(x),  p = softmax(z)
           L = 0.5 (CE + Dice)(z_l, y_l) + lambda(t) * CE(D(p_u, x_u), 1)

       Gradients reach S through D; the engine steps S only.
    2. Discriminator step (``after_step``; S in eval mode, under no_grad, D in train mode)::

           p = softmax(S(x)) for the whole batch
           L_D = CE(D(p, x), [1] * B_l + [0] * B_u)

       then one Adam step on D (through the run's gradient scaler, if any). Under DDP, D's
       gradients are averaged over the ranks first (``ctx.all_reduce_gradients``): D is outside
       the engine's DDP step, and without it each rank's D would drift on its own shard.

    Differences from SSL4MIS (``train_adversarial_network_{2D,3D}.py``):
      * the targets are built from the batch's labeled and unlabeled counts, so any ``B_u`` works;
        SSL4MIS needs ``B_u = B_l`` (2D slices the all-ones part of the target vector, 3D
        hard-codes ``[1, 1, 0, 0]``);
      * the registry's discriminators pool globally, so any patch of at least 16 per axis works
        (SSL4MIS: only 256x256 and 96^3).
    """

    @dataclass
    class Config(MethodConfig):
        consistency: float = 0.1
        discriminator_lr: float = 1e-4
        discriminator_betas: tuple[float, float] = (0.9, 0.99)

    log_keys = ("loss_sup", "loss_adv")
    paper = ("Zhang et al., Deep Adversarial Networks for Biomedical Image Segmentation Utilizing Unannotated "
             "Images, MICCAI 2017")

    def __init__(self, config, spec) -> None:
        super().__init__(config, spec)
        self._optimizer: torch.optim.Optimizer | None = None
        self._images: tuple[Tensor, Tensor] | None = None

    def build(self) -> None:
        self.nets["student"] = self.create_network()
        # The run's model_options are the segmenter's; the discriminator takes none of them.
        name = "discriminator" if self.spec.dim == 2 else "discriminator_3d"
        self.nets["discriminator"] = self.create_network(name, inherit_options=False)

    def trainable_parameters(self):
        # The engine's SGD trains the segmenter; the discriminator has its own Adam.
        return (p for p in self.nets["student"].parameters() if p.requires_grad)

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizer is None:
            cfg = self.config
            self._optimizer = torch.optim.Adam(self.nets["discriminator"].parameters(), lr=cfg.discriminator_lr,
                                               betas=tuple(cfg.discriminator_betas))
        return {"discriminator": self._optimizer}

    def train(self) -> None:
        self.nets["student"].train()
        self.nets["discriminator"].eval()  # during the segmenter step (SSL4MIS)

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        student, disc = self.nets["student"], self.nets["discriminator"]
        x_u = batch.unlabeled_image
        logits_l, logits_u = split_labeled(student(batch.images()), batch)
        loss_sup = supervised_loss(logits_l, batch.labeled_label)
        probs_u = torch.softmax(logits_u.float(), 1)
        fooled = torch.full((x_u.shape[0],), LABELED, dtype=torch.long, device=x_u.device)
        loss_adv = F.cross_entropy(disc(probs_u, x_u).float(), fooled)
        loss = loss_sup + ctx.consistency_weight * loss_adv
        self._images = (batch.labeled_image, x_u)  # for the discriminator step in after_step
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_adv": loss_adv.detach()})

    def after_step(self, ctx: StepContext) -> None:
        if self._images is None:
            raise RuntimeError("adversarial: after_step() called without a preceding step()")
        x_l, x_u = self._images
        self._images = None
        student, disc = self.nets["student"], self.nets["discriminator"]
        opt = self.extra_optimizers()["discriminator"]
        x = torch.cat([x_l, x_u])
        student_was_training = student.training
        student.eval()
        disc.train()
        try:
            with ctx.autocast():
                with torch.no_grad():
                    probs = torch.softmax(student(x).float(), 1)
                logits_d = disc(probs, x)
            loss_d = F.cross_entropy(logits_d.float(), discriminator_targets(x_l.shape[0], x_u.shape[0], x.device))
            opt.zero_grad(set_to_none=True)  # also drops the gradients the segmenter step left on D
            ctx.backward(loss_d)
            ctx.all_reduce_gradients(disc.parameters())  # DDP: D learns from the whole batch, stays identical
            ctx.optimizer_step(opt)
        finally:
            student.train(student_was_training)
            disc.eval()
