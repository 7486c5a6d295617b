"""FixMatch (Sohn et al., NeurIPS 2020) for segmentation, with a RandAugment or CTAugment policy."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from sslseg.data import Batch, CTAugment, RandAugment, cutout, derive_seed
from sslseg.data.policies import probe_proximity
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods._pseudo import pseudo_label_loss, pseudo_labels
from sslseg.methods.base import MethodConfig, SSLMethod, StepContext, StepOutput, register_method, split_labeled

__all__ = ["FixMatch", "fixmatch_unsup_loss", "probe_proximity"]

_POLICIES = ("ctaugment", "randaugment")
_UNSUP = ("ce", "ce_dice")


def fixmatch_unsup_loss(strong_logits: Tensor, weak_probs: Tensor, threshold: float, kind: str = "ce_dice"):
    """FixMatch's unlabeled term on a batch and its pseudo-labels.

    ``ŷ = argmax q`` and ``m = [max q >= threshold]`` from the weak-view probabilities ``q``;
    ``CE = sum_voxels m * CE(z_strong, ŷ) / #voxels`` (masked voxels count in the denominator, as
    FixMatch's ``1/(mu B)``); with ``kind="ce_dice"`` the loss is ``0.5 (CE + Dice)`` where the
    Dice skips the masked voxels.

    Returns:
        ``(loss, PseudoLabels)``.
    """
    if kind not in _UNSUP:
        raise ValueError(f"fixmatch: unsup_loss must be one of {_UNSUP}, got {kind!r}")
    pl = pseudo_labels(weak_probs, threshold)
    return pseudo_label_loss(strong_logits, pl.labels, pl.mask, kind), pl


@contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


@register_method("fixmatch")
class FixMatch(SSLMethod):
    """FixMatch: confident weak-view predictions are hard pseudo-labels for a strong view.

    Paper: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
    Confidence", NeurIPS 2020.

    Loss: ``L = 0.5 (CE + Dice)(f(x_l), y_l) + lambda_u * L_u`` with ``q = softmax(g(x_u^weak))``,
    ``ŷ = argmax q``, ``m = [max q >= threshold]`` and ``L_u = 0.5 (sum m * CE(f(x_u^strong), ŷ) /
    #voxels + Dice_m(softmax(f(x_u^strong)), ŷ))`` (``unsup_loss="ce"``: the CE term alone, as in
    the paper). ``g`` is the student itself, its weak pass detached (the paper), or an EMA teacher
    (``ema_teacher=True``, SSL4MIS-CTA). The weak view is the loader's geometric augmentation;
    the strong view applies, on the device inside the step, either CTAugment (``policy=
    "ctaugment"``: ``cta_depth`` photometric ops with learned magnitude bins, then cutout) or
    RandAugment (``"randaugment"``: ``ra_num_ops`` random photometric ops, then cutout) to the
    weak view. With CTAugment, each step also probes the labeled images: a random-magnitude
    policy is applied, ``g`` predicts them in eval mode (no gradient) and the bins used are
    rewarded with ``mean_voxels p(true class)`` (FixMatch's ``1 - 0.5 |p - onehot|_1``); rewards
    are applied every ``cta_update_every`` steps (one host sync then, none per step).

    Defaults follow the paper: ``threshold=0.95``, ``lambda_u = consistency = 1`` constant
    (``rampup=True`` uses the engine's sigmoid ramp-up instead), pseudo-labels from the student.
    ``eval_model`` is the EMA teacher when there is one (SSL4MIS validates it), else the student
    (the paper evaluates an EMA of the weights but labels with the raw model; here the EMA, when
    enabled, does both).

    Differences from SSL4MIS, whose FixMatch variants do not mask (spec 8.20-21):
      * real confidence masking: low-confidence voxels are ignored (SSL4MIS-CTA applies no
        threshold; SSL4MIS-standard relabels them as background). ``threshold=0`` reproduces the
        unmasked CTA variant; SSL4MIS declares ``conf_thresh=0.8``;
      * CTAugment is probed on labeled images with the model's accuracy, as in the paper, and
        updated continually; SSL4MIS rewards one policy per epoch with ``1 - 0.5 * loss``;
      * every unlabeled image draws its own strong policy (SSL4MIS: one policy for a whole epoch);
      * CTAugment's weak geometric policy is not used: the loader's rot/flip/rotate is the weak
        view; the strong ops are photometric and never touch the label, so no label interpolation
        artefacts (spec 8.20) can occur;
      * no skipping of batches with few foreground voxels (SSL4MIS reads the unlabeled ground
        truth for that); ``0.5 (CE + Dice)`` supervision and ``lambda_u = 1`` where SSL4MIS uses
        ``CE + Dice`` and ``0.1 x`` ramp-up (``consistency=0.1, rampup=True, ema_teacher=True,
        threshold=0`` is SSL4MIS-CTA's loss, up to the factor 0.5);
      * SSL4MIS-standard's "complementary" negative-learning loss is not implemented.

    Distributed (DDP): each rank draws its own strong views; CTAugment's rewards are gathered from
    every rank (``ctx.all_gather_object``) before they update the rates, which therefore stay
    identical across ranks and learn from the whole batch.
    """

    @dataclass
    class Config(MethodConfig):
        threshold: float = 0.95
        policy: str = "ctaugment"
        consistency: float = 1.0
        rampup: bool = False
        unsup_loss: str = "ce_dice"
        ema_teacher: bool = False
        ema_decay: float = 0.99
        cutout: float = 0.5
        ra_num_ops: int = 2
        ra_magnitude: float | None = None
        cta_depth: int = 2
        cta_threshold: float = 0.85
        cta_decay: float = 0.99
        cta_update_every: int = 10

        def __post_init__(self) -> None:
            if self.policy not in _POLICIES:
                raise ValueError(f"fixmatch: policy must be one of {_POLICIES}, got {self.policy!r}")
            if self.unsup_loss not in _UNSUP:
                raise ValueError(f"fixmatch: unsup_loss must be one of {_UNSUP}, got {self.unsup_loss!r}")
            if not 0.0 <= self.threshold <= 1.0:
                raise ValueError(f"fixmatch: threshold must be in [0, 1], got {self.threshold}")
            if not 0.0 <= self.cutout <= 1.0:
                raise ValueError(f"fixmatch: cutout must be in [0, 1] (max side / image side x 2), got {self.cutout}")
            if not isinstance(self.cta_update_every, int) or self.cta_update_every < 1:
                raise ValueError(f"fixmatch: cta_update_every must be an int >= 1, got {self.cta_update_every!r}")

    log_keys = ("loss_sup", "loss_unsup", "mask_ratio")
    paper = ("Sohn et al., FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence, "
             "NeurIPS 2020")

    @classmethod
    def consistency_mode(cls, config: MethodConfig) -> str | None:
        """``"ramp"`` with ``rampup=True``, else ``"constant"`` (``consistency`` at every step)."""
        return "ramp" if config.rampup else "constant"

    def build(self) -> None:
        cfg = self.config
        self.nets["student"] = self.create_network()
        if cfg.ema_teacher:
            self.add_ema_teacher(decay=cfg.ema_decay, train_mode=True)  # SSL4MIS-CTA keeps its teacher in train mode
        from sslseg.utils.distributed import get_rank

        # Under DDP each rank draws its own strong views (rank 0 keeps the single-process stream).
        rank = get_rank()
        self.generator = torch.Generator().manual_seed(derive_seed(self.spec.seed, 0xF1C5, *((rank,) if rank else ())))
        self.cta = CTAugment(cfg.cta_depth, cfg.cta_threshold, cfg.cta_decay) if cfg.policy == "ctaugment" else None
        self.randaugment = (RandAugment(cfg.ra_num_ops, cfg.ra_magnitude, cutout_size=cfg.cutout)
                            if cfg.policy == "randaugment" else None)

    def labeler(self) -> nn.Module:
        """The network whose weak predictions become pseudo-labels (and that CTAugment probes)."""
        return self.teachers["teacher"] if "teacher" in self.teachers else self.nets["student"]

    def eval_model(self) -> nn.Module:
        return self.labeler()

    # ---- strong views and CTAugment ---------------------------------------------------------------

    def _cutout(self, image: Tensor) -> Tensor:
        if self.config.cutout <= 0:
            return image
        return cutout(image, float(torch.rand((), generator=self.generator)) * 2 * self.config.cutout, self.generator)

    def make_strong_views(self, images: Tensor) -> Tensor:
        """A strong view of each image (photometric policy + cutout), drawn from ``self.generator``."""
        out = []
        with torch.no_grad():
            for img in images:
                if self.cta is not None:
                    policy = self.cta.policy(self.generator, weak=False)
                    img, _ = CTAugment.apply(img, None, policy, self.generator)
                    img = self._cutout(img)
                else:
                    img = self.randaugment(img, generator=self.generator)
                out.append(img)
        return torch.stack(out).to(images.dtype)

    def _probe(self, batch: Batch) -> None:
        policies, views = [], []
        with torch.no_grad():
            for img in batch.labeled_image:
                policy = self.cta.policy(self.generator, weak=False, probe=True)
                views.append(CTAugment.apply(img, None, policy, self.generator)[0])
                policies.append(policy)
            net = self.labeler()
            with _eval_mode(net):
                probs = torch.softmax(net(torch.stack(views)).float(), 1)
            self.cta.record(policies, probe_proximity(probs, batch.labeled_label))

    def flush_cta(self, gather: Callable[[Any], list[Any]] | None = None) -> None:
        """Apply the pending CTAugment rewards (one host sync; see :meth:`CTAugment.apply_pending`).

        Args:
            gather: ``ctx.all_gather_object`` under DDP, so the rates stay identical across ranks.
        """
        self.cta.apply_pending(gather)

    # ---- one step ---------------------------------------------------------------------------------

    def step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        cfg = self.config
        if self.cta is not None and len(self.cta.pending) >= cfg.cta_update_every:
            self.flush_cta(ctx.all_gather_object)
        student = self.nets["student"]
        x_w = batch.unlabeled_image
        x_s = self.make_strong_views(x_w)
        if "teacher" in self.teachers:
            with torch.no_grad():
                q = torch.softmax(self.teachers["teacher"](x_w).float(), 1)
            z_l, z_s = split_labeled(student(torch.cat([batch.labeled_image, x_s])), batch)
        else:
            # One pass over labeled, weak and strong images (shared BatchNorm statistics, as FixMatch).
            z_l, z_u = split_labeled(student(torch.cat([batch.labeled_image, x_w, x_s])), batch)
            z_w, z_s = z_u.chunk(2)
            q = torch.softmax(z_w.detach().float(), 1)
        loss_sup = supervised_loss(z_l, batch.labeled_label)
        loss_unsup, pl = fixmatch_unsup_loss(z_s, q, cfg.threshold, cfg.unsup_loss)
        weight = ctx.consistency_weight if cfg.rampup else cfg.consistency
        if self.cta is not None:
            self._probe(batch)
        loss = loss_sup + weight * loss_unsup
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(),
                                 "mask_ratio": pl.ratio})

    # ---- checkpointed state -----------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.cta is not None:
            state["cta"] = self.cta.state_dict()
            state["pending"] = self.cta.pending_state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if self.cta is not None:
            self.cta.load_state_dict(state["cta"])
            self.cta.load_pending_state(state["pending"], next(self.nets["student"].parameters()).device)
