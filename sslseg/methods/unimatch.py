"""UniMatch (Yang et al., CVPR 2023): weak-to-strong consistency with dual strong views and feature perturbation."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslseg.data import Batch, RandAugment, StrongAugment
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods._pseudo import PSEUDO_LOSSES, cutmix_box, pseudo_label_loss
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["UniMatch", "feature_perturbation", "mix_boxes"]

#: UniMatch's strong intensity transforms by ``strong_aug`` name; no cutout, since the method
#: does its own CutMix on the strong views.
STRONG_AUGMENTS = {
    "jitter": lambda: StrongAugment(p=0.8, cutout_prob=0.0),
    "randaugment": lambda: RandAugment(cutout_size=0.0),
}


@contextmanager
def feature_perturbation(net: nn.Module, p: float, dim: int) -> Iterator[None]:
    """While active, ``net(x)`` returns predictions for ``[x; x]`` where the second half's encoder
    features went through channel dropout ``p`` (``Dropout2d`` / ``Dropout3d``, UniMatch's FP
    stream): the decoder runs once on ``cat(features, dropout(features))``.

    ``net`` needs an ``encoder`` submodule that is called once per forward and returns a tensor or a
    list of tensors (``unet``, ``unet_3d``, ``attention_unet``, ``efficient_unet``, ...).
    """
    encoder = getattr(net, "encoder", None)
    if not isinstance(encoder, nn.Module) or type(encoder).forward is nn.Module.forward:
        raise ValueError(
            f"unimatch: feature perturbation needs a network with a callable 'encoder' submodule whose features "
            f"feed the decoder (unet, unet_3d, attention_unet, ...); {type(net).__name__} has none. "
            "Use feature_perturbation=False"
        )
    drop = F.dropout2d if dim == 2 else F.dropout3d

    def perturb(f: Tensor) -> Tensor:
        return torch.cat([f, drop(f, p, training=True)])

    def hook(module: nn.Module, inputs, output):
        if isinstance(output, Tensor):
            return perturb(output)
        return type(output)(perturb(f) for f in output) if isinstance(output, tuple) else [perturb(f) for f in output]

    handle = encoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def mix_boxes(images: Tensor, partners: Tensor, boxes: Tensor) -> Tensor:
    """``images`` with ``partners`` pasted inside ``boxes`` (``(B, *spatial)`` bool), per sample."""
    return torch.where(boxes.unsqueeze(1), partners, images)


@register_method("unimatch")
class UniMatch(SSLMethod):
    """UniMatch: FixMatch with two strong views per image and a feature-perturbation stream.

    Paper: Yang, Qi, Feng, Zhang & Shi, "Revisiting Weak-to-Strong Consistency in Semi-Supervised
    Semantic Segmentation", CVPR 2023 (code: LiheYoung/UniMatch, ``more-scenarios/medical``).

    One network, no teacher. Per step, with ``x_w`` the weak (loader-augmented) unlabeled view
    and ``s1, s2`` two independent strong views (intensity jitter from the loader, then CutMix
    done here: with probability ``cutmix_prob`` a box covering 2-40% of the image, aspect ratio
    0.3-3.3, is replaced by the same box of another unlabeled sample's strong view; with a
    single unlabeled sample per batch (per process) the partner is a labeled sample instead, its
    weak view pasted with its ground truth as the target, so no sample is mixed with itself):

    1. ``f(cat(x_l, x_w))`` with the FP stream: the decoder also sees the encoder features
       perturbed by channel dropout (``fp_dropout`` 0.5), giving ``z_l, z_w`` and ``z_w^fp``;
    2. ``f(cat(s1, s2))`` gives ``z_s1, z_s2``;
    3. ``q = softmax(sg(z_w))``, ``ŷ = argmax q``, ``m = [max q >= threshold]`` (0.95); inside the
       CutMix boxes the partner's ``ŷ, m`` are used;
    4. ``L = (0.5 (CE + Dice)(z_l, y_l) + (w_s / 2)(l(z_s1) + l(z_s2)) + w_fp * l(z_w^fp)) / 2`` with
       ``w_s = w_fp = 0.5`` and ``l`` = Dice over the confident voxels (``unsup_loss="dice"``, the
       official medical code; ``"ce"``: masked CE over all voxels, the natural-image code;
       ``"ce_dice"``: both halved).

    No ramp-up and no consistency weight (the paper's weights are constant).

    Differences from the official code:
      * CutMix partners are the other samples of the same unlabeled batch (rolled by one; a labeled
        sample when the batch holds one unlabeled sample), and
        their pseudo-labels come from the same weak pass; the official code draws a second
        unlabeled batch and predicts it in eval mode, one more forward per step;
      * the strong intensity transform (``strong_aug``) is by default sslseg's
        :class:`~sslseg.data.StrongAugment` (``"jitter"``: each of brightness, contrast, gamma,
        blur, noise with p = 0.8, no cutout), an intensity analogue of UniMatch's ColorJitter(p 0.8)
        + blur(p 0.5) on 8-bit images; ``"randaugment"`` uses :class:`~sslseg.data.RandAugment`
        (2 random photometric ops of random magnitude, no cutout) instead;
      * 3D (not in the paper) uses the same recipe: ``Dropout3d`` features and cuboid CutMix;
      * the FP stream is a forward hook on the network's ``encoder`` (any sslseg network with
        one), where UniMatch adds a ``need_fp`` argument to its U-Net.
    """

    @dataclass
    class Config(MethodConfig):
        threshold: float = 0.95
        unsup_loss: str = "dice"
        weight_strong: float = 0.5
        weight_fp: float = 0.5
        feature_perturbation: bool = True
        fp_dropout: float = 0.5
        cutmix_prob: float = 0.5
        strong_aug: str = "jitter"

        def __post_init__(self) -> None:
            if self.strong_aug not in STRONG_AUGMENTS:
                raise ValueError(f"unimatch: strong_aug must be one of {tuple(STRONG_AUGMENTS)}, got {self.strong_aug!r}")
            if self.unsup_loss not in PSEUDO_LOSSES:
                raise ValueError(f"unimatch: unsup_loss must be one of {PSEUDO_LOSSES}, got {self.unsup_loss!r}")
            for name in ("threshold", "fp_dropout", "cutmix_prob"):
                if not 0.0 <= getattr(self, name) <= 1.0:
                    raise ValueError(f"unimatch: {name} must be in [0, 1], got {getattr(self, name)}")

    strong_aug = STRONG_AUGMENTS["jitter"]()  # the default of the config's strong_aug (strong_augment())
    strong_views = 2
    log_keys = ("loss_sup", "loss_strong", "loss_fp", "mask_ratio")
    paper = ("Yang et al., Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic Segmentation, "
             "CVPR 2023")

    def strong_augment(self) -> StrongAugment | RandAugment:
        return STRONG_AUGMENTS[self.config.strong_aug]()

    def _boxes(self, n: int, spatial: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.stack([cutmix_box(spatial, p=self.config.cutmix_prob, device=device) for _ in range(n)])

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        cfg = self.config
        net = self.nets["student"]
        if batch.unlabeled_strong is None or batch.unlabeled_strong2 is None:
            raise ValueError("unimatch needs two strong views of the unlabeled images (strong_views=2)")
        n_u = batch.unlabeled_bs
        spatial = tuple(batch.unlabeled_image.shape[2:])
        device = batch.unlabeled_image.device
        # The partner of unlabeled sample i is unlabeled sample i+1; one unlabeled sample has none
        # there (rolling would mix it with itself), so it takes labeled sample 0 and its label.
        from_labeled = n_u == 1
        if from_labeled and batch.labeled_bs == 0:
            raise ValueError("unimatch: CutMix needs a partner for each unlabeled sample: another unlabeled sample or "
                             "a labeled one; the batch holds 1 unlabeled and 0 labeled samples (raise batch_size, or "
                             "set cutmix_prob=0)")
        partner = torch.zeros(1, dtype=torch.long, device=device) if from_labeled else \
            (torch.arange(n_u, device=device) + 1) % n_u
        box1, box2 = self._boxes(n_u, spatial, device), self._boxes(n_u, spatial, device)
        p1 = batch.labeled_image[partner] if from_labeled else batch.unlabeled_strong[partner]
        p2 = batch.labeled_image[partner] if from_labeled else batch.unlabeled_strong2[partner]
        s1 = mix_boxes(batch.unlabeled_strong, p1, box1)
        s2 = mix_boxes(batch.unlabeled_strong2, p2, box2)

        x = torch.cat([batch.labeled_image, batch.unlabeled_image])
        if cfg.feature_perturbation:
            with feature_perturbation(net, cfg.fp_dropout, self.spec.dim):
                out = net(x)
            if out.shape[0] != 2 * x.shape[0]:
                raise ValueError(f"unimatch: the {type(net).__name__} encoder hook did not perturb the features; "
                                 "use feature_perturbation=False")
            clean, fp = out.chunk(2)
            z_w_fp = split_labeled(fp, batch)[1]
        else:
            clean, z_w_fp = net(x), None
        z_l, z_w = split_labeled(clean, batch)
        z_s1, z_s2 = net(torch.cat([s1, s2])).chunk(2)

        with torch.no_grad():
            conf, plab = torch.softmax(z_w.detach().float(), 1).max(1)
            mask = conf >= cfg.threshold
            if from_labeled:  # a labeled partner's target is its ground truth, confident everywhere
                plab_p = batch.labeled_label[partner].to(plab.dtype)
                mask_p = torch.ones_like(mask)
            else:
                plab_p, mask_p = plab[partner], mask[partner]
            plab1 = torch.where(box1, plab_p, plab)
            plab2 = torch.where(box2, plab_p, plab)
            mask1 = torch.where(box1, mask_p, mask)
            mask2 = torch.where(box2, mask_p, mask)

        loss_sup = supervised_loss(z_l, batch.labeled_label)
        loss_s1 = pseudo_label_loss(z_s1, plab1, mask1, cfg.unsup_loss)
        loss_s2 = pseudo_label_loss(z_s2, plab2, mask2, cfg.unsup_loss)
        loss_strong = 0.5 * (loss_s1 + loss_s2)
        loss = loss_sup + cfg.weight_strong * loss_strong
        if z_w_fp is not None:
            loss_fp = pseudo_label_loss(z_w_fp, plab, mask, cfg.unsup_loss)
            loss = loss + cfg.weight_fp * loss_fp
        else:
            loss_fp = loss_sup.detach() * 0
        loss = 0.5 * loss
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_strong": loss_strong.detach(),
                                 "loss_fp": loss_fp.detach(), "mask_ratio": mask.float().mean()})
