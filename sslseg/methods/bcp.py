"""Bidirectional Copy-Paste (Bai et al., CVPR 2023), 2D and 3D."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sslseg.data import Batch
from sslseg.methods._pseudo import largest_component, masked_cross_entropy, masked_dice_loss, random_box
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method
from sslseg.ops import ema_update_

__all__ = ["BidirectionalCopyPaste", "copy_paste_mask", "region_loss"]


def copy_paste_mask(size: tuple[int, ...], ratio: float = 2 / 3, *, device=None,
                    generator: torch.Generator | None = None) -> Tensor:
    """BCP's mixing mask ``M``: ones everywhere except a zero box of ``int(ratio * side)`` per axis.

    ``M`` is ``(*size)`` float, one box for the whole batch (BCP's ``generate_mask`` /
    ``context_mask``), at a uniform random position.
    """
    box = tuple(int(s * ratio) for s in size)
    return (~random_box(size, box, device=device, generator=generator)).float()


def region_loss(logits: Tensor, target: Tensor, region: Tensor) -> Tensor:
    """``0.5 * (Dice_region + CE_region)`` of ``logits`` against ``target`` on ``region`` only.

    ``CE_region = sum(region * CE) / sum(region)``; ``Dice_region`` counts only voxels of the region
    (BCP's ``mix_loss`` terms, before their weights).

    Args:
        logits: ``(B, C, *spatial)``.
        target: ``(B, *spatial)`` labels.
        region: ``(*spatial)`` or ``(B, *spatial)`` 0/1 mask.
    """
    region = region.expand(target.shape).bool()
    ce = masked_cross_entropy(logits, target, region, normalize="valid")
    dice = masked_dice_loss(torch.softmax(logits.float(), 1), target, region)
    return 0.5 * (dice + ce)


@register_method("bcp")
class BidirectionalCopyPaste(SSLMethod):
    """Bidirectional copy-paste: labeled and unlabeled images are mixed both ways, with a mean teacher.

    Paper: Bai, Chen, Li, Shen & Wang, "Bidirectional Copy-Paste for Semi-Supervised Medical Image
    Segmentation", CVPR 2023 (code: DeepMed-Lab-ECNU/BCP).

    Each step takes ``n = max(1, min(B_l, B_u) // 2)`` pairs: labeled ``x_a, x_b`` (first and second
    half of the labeled samples) and unlabeled ``u_a, u_b``. A mask ``M`` is 1 except for one
    random box of ``mask_ratio`` (2/3) of every side, shared by the batch. The EMA teacher gives
    hard pseudo-labels ``ŷ_a, ŷ_b = argmax teacher(u_a), teacher(u_b)`` (optionally keeping each
    class's largest connected component, ``largest_cc``). The student sees the two mixed images

    * ``X_in = u_a * M + x_a * (1 - M)`` (labeled box pasted into an unlabeled image; "inward"),
    * ``X_out = x_b * M + u_b * (1 - M)`` (unlabeled box pasted into a labeled image; "outward"),

    and ``L = l(X_in; ŷ_a on M, y_a on 1-M) + l(X_out; y_b on M, ŷ_b on 1-M)`` where each
    region's term is ``0.5 (Dice + CE)`` restricted to the region, weighted 1 on labeled pixels
    and ``u_weight`` (alpha = 0.5) on pseudo-labeled pixels. Logged: ``loss_sup`` (labeled-pixel
    terms) and ``loss_pseudo`` (pseudo-labeled terms, before ``u_weight``); ``L = loss_sup +
    u_weight * loss_pseudo``. No ramp-up: the weight is constant, as in the paper. After each
    step the teacher follows the student by EMA with a constant ``ema_decay`` (0.99).

    Pre-training stage (the paper's first stage): the first ``round(pretrain_fraction *
    iterations)`` steps train the student on labeled images only, copy-pasting ``x_b``'s box into
    ``x_a`` (labels mixed the same way, weight 1 on both regions); at the switch the teacher
    becomes an exact copy of the student and self-training starts. ``pretrain_fraction=0``
    skips it (the teacher then follows the student with Mean Teacher's warm-up rule). The stage
    length is computed from the run's ``iterations``, so resuming with more iterations moves it.

    Differences from the paper / official code:
      * the two stages run in one engine run with one optimizer and one poly learning-rate schedule
        over both (the code starts a fresh SGD per stage: constant lr on ACDC, x0.1 every 2500 steps
        on LA) and self-training continues from the last pre-training step instead of the best
        validated one; BCP uses 10k + 30k steps on ACDC and 2k + 15k on LA, hence the default
        ``pretrain_fraction = 0.25``;
      * pseudo-labels are the teacher's argmax (LA's ``p_fg >= 0.5`` is the same for two classes);
        the largest-connected-component filter of the official code is off by default
        (``largest_cc=True`` turns it on; it costs one host copy per step) since the paper's
        method does not include it;
      * pairs are formed from ``min(B_l, B_u) // 2`` samples of each stream, which is BCP's
        ``labeled_bs / 2`` split when ``B_l = B_u``; floating buffers (BatchNorm statistics) are
        averaged by the EMA too (the ACDC code averages the whole state dict; LA parameters only);
      * the two mixed batches go through the student in one pass (BCP runs two, so its
        BatchNorm statistics are per mixed batch).
    """

    @dataclass
    class Config(MethodConfig):
        u_weight: float = 0.5
        mask_ratio: float = 2 / 3
        ema_decay: float = 0.99
        pretrain_fraction: float = 0.25
        largest_cc: bool = False

        def __post_init__(self) -> None:
            if not 0.0 < self.mask_ratio < 1.0:
                raise ValueError(f"bcp: mask_ratio must be in (0, 1), got {self.mask_ratio}")
            if not 0.0 <= self.pretrain_fraction < 1.0:
                raise ValueError(f"bcp: pretrain_fraction must be in [0, 1), got {self.pretrain_fraction}")
            if self.u_weight < 0:
                raise ValueError(f"bcp: u_weight must be >= 0, got {self.u_weight}")

    log_keys = ("loss_sup", "loss_pseudo")
    paper = "Bai et al., Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation, CVPR 2023"

    def build(self) -> None:
        self.nets["student"] = self.create_network()
        self.add_ema_teacher(decay=self.config.ema_decay, train_mode=True)  # BCP keeps its teacher in train mode

    def pretrain_steps(self, iterations: int) -> int:
        """Steps of the labeled-only pre-training stage for a run of ``iterations`` steps."""
        return int(round(self.config.pretrain_fraction * iterations))

    def _mask(self, like: Tensor) -> Tensor:
        return copy_paste_mask(tuple(like.shape[2:]), self.config.mask_ratio, device=like.device)

    def _pretrain_step(self, batch: Batch) -> StepOutput:
        x, y = batch.labeled_image, batch.labeled_label
        n = max(1, x.shape[0] // 2)
        idx_a = torch.arange(n, device=x.device)
        idx_b = (idx_a + n) % x.shape[0]
        m = self._mask(x)
        mix = x[idx_a] * m + x[idx_b] * (1 - m)
        z = self.nets["student"](mix)
        inside = m.bool()
        loss = region_loss(z, y[idx_a], inside) + region_loss(z, y[idx_b], ~inside)
        zero = loss.detach() * 0
        return StepOutput(loss, {"loss_sup": loss.detach(), "loss_pseudo": zero})

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        cfg = self.config
        pre = self.pretrain_steps(ctx.iterations)
        if ctx.step < pre:
            return self._pretrain_step(batch)
        if ctx.step == pre and pre > 0:
            # Self-training starts from the pre-trained student, teacher included (BCP's load_net).
            ema_update_(self.teachers["teacher"], self.nets["student"], 0.0)
        x_l, y_l, x_u = batch.labeled_image, batch.labeled_label, batch.unlabeled_image
        n = max(1, min(batch.labeled_bs, batch.unlabeled_bs) // 2)
        ar = torch.arange(n, device=x_l.device)
        la, lb = ar % batch.labeled_bs, (ar + n) % batch.labeled_bs
        ua, ub = ar % batch.unlabeled_bs, (ar + n) % batch.unlabeled_bs
        with torch.no_grad():
            teacher = self.teachers["teacher"]
            plab = teacher(torch.cat([x_u[ua], x_u[ub]])).float().argmax(1)
            if cfg.largest_cc:
                plab = largest_component(plab, self.spec.num_classes)
            plab_a, plab_b = plab.split([n, n])
        m = self._mask(x_l)
        inside = m.bool()  # M = 1: the base image; M = 0: the pasted box
        mix_in = x_u[ua] * m + x_l[la] * (1 - m)
        mix_out = x_l[lb] * m + x_u[ub] * (1 - m)
        z_in, z_out = self.nets["student"](torch.cat([mix_in, mix_out])).split([n, n])
        loss_sup = region_loss(z_in, y_l[la], ~inside) + region_loss(z_out, y_l[lb], inside)
        loss_pseudo = region_loss(z_in, plab_a, inside) + region_loss(z_out, plab_b, ~inside)
        loss = loss_sup + cfg.u_weight * loss_pseudo
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_pseudo": loss_pseudo.detach()})

    def teacher_decay(self, name: str, ctx: StepContext) -> float:
        pre = self.pretrain_steps(ctx.iterations)
        # Constant decay once self-training started from a pre-trained teacher (BCP); Mean
        # Teacher's warm-up while pre-training and when there is no pre-training stage.
        return self.config.ema_decay if 0 < pre <= ctx.step else super().teacher_decay(name, ctx)
