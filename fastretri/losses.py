"""FastRetri's losses (fast-reid ``Baseline.losses``): ``MODEL.LOSSES.NAME`` picks which are summed.

* ``CrossEntropyLoss`` on the classifier outputs after ``MODEL.HEADS.CLS_LAYER``'s margin and scale
  (fastreid.layers.any_softmax), with fast-reid's label smoothing: 1 - eps on the target, eps / (C - 1) on every
  other class (torch's ``label_smoothing`` puts eps / C on every class including the target); eps < 0 is fast-reid's
  adaptive smoothing, ALPHA times the target's softmax probability. The summed loss is divided by the number of
  rows whose loss is not exactly 0, as fast-reid does (the batch mean unless a row's loss underflows to 0).
* ``TripletLoss``, ``CircleLoss``, ``Cosface`` on the batch's features (``MODEL.HEADS.NECK_FEAT``: the pooled
  feature ``before`` the BNNeck, or its output ``after``), with fast-reid's mining and masks. Like fast-reid, each
  process computes them on its own share of the batch.
"""

from typing import Dict, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from common.device import upcast

__all__ = [
    "LOSS_NAMES",
    "classifier_outputs",
    "cross_entropy",
    "triplet_loss",
    "pairwise_circle_loss",
    "pairwise_cosface",
    "LabelSmoothingCrossEntropy",
    "FastRetriLoss",
]

LOSS_NAMES = ("CrossEntropyLoss", "TripletLoss", "CircleLoss", "Cosface")
_MASKED = -99999999.0  # fast-reid's logit for pairs a pairwise loss leaves out


def classifier_outputs(logits: torch.Tensor, targets: torch.Tensor, kind: str, scale: float, margin: float):
    """fastreid ``any_softmax``: ``logits`` (``embedding @ W.T`` for Linear, cosine similarities otherwise) ->
    what cross-entropy sees. Linear: ``s * l``; CosSoftmax: ``s * (l - m)`` at the target; ArcSoftmax:
    ``s * cos(arccos(l) + m)`` at the target; CircleSoftmax: ``s * a_p (l - (1 - m))`` at the target and
    ``s * a_n (l - m)`` elsewhere, with ``a_p = max(1 + m - l, 0)``, ``a_n = max(l + m, 0)`` held constant."""
    if kind == "Linear":
        return logits * scale
    target = F.one_hot(targets, logits.shape[1]).bool()
    if kind == "CosSoftmax":
        return (logits - margin * target) * scale
    if kind == "ArcSoftmax":
        return torch.cos(torch.acos(logits) + margin * target) * scale
    if kind == "CircleSoftmax":
        fixed = logits.detach()
        pos = (1 + margin - fixed).clamp(min=0) * (logits - (1 - margin))
        neg = (fixed + margin).clamp(min=0) * (logits - margin)
        return torch.where(target, pos, neg) * scale
    raise ValueError(f"unknown classifier layer {kind!r}")


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, eps: float, alpha: float = 0.2) -> torch.Tensor:
    """fast-reid ``cross_entropy_loss(pred, gt, eps, alpha)``: smoothed targets, summed over the rows and divided by
    the number of non-zero rows (at least 1)."""
    log_probs = F.log_softmax(outputs, dim=1)
    with torch.no_grad():
        if eps >= 0:
            smooth = torch.full((len(outputs), 1), eps, dtype=log_probs.dtype, device=log_probs.device)
        else:  # adaptive: alpha x the probability of the target class
            smooth = alpha * F.softmax(outputs, dim=1).gather(1, targets[:, None])
        weights = (smooth / max(outputs.shape[1] - 1, 1)).expand_as(log_probs).clone()
        weights.scatter_(1, targets[:, None], 1 - smooth)
    rows = (-weights * log_probs).sum(dim=1)
    return rows.sum() / torch.count_nonzero(rows.detach()).clamp(min=1)


def _same_label(targets: torch.Tensor) -> torch.Tensor:
    return (targets[:, None] == targets[None, :]).float()


def _softmax_weights(dist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    top = (dist * mask).max(dim=1, keepdim=True)[0]
    e = torch.exp(dist - top) * mask
    return e / (e.sum(dim=1, keepdim=True) + 1e-6)


def triplet_loss(
    features: torch.Tensor, targets: torch.Tensor, margin: float, norm_feat: bool, hard_mining: bool
) -> torch.Tensor:
    """fast-reid ``triplet_loss``: euclidean distances (``norm_feat``: 2 - 2 cos), each anchor's positive and negative
    distance by hard mining (farthest positive, nearest negative) or softmax-weighted mining (positives include the
    anchor itself), then ``max(0, d_ap - d_an + margin)`` averaged, or the soft margin ``log(1 + exp(d_ap - d_an))``
    when ``margin <= 0`` (margin 0.3 if that overflows)."""
    if norm_feat:
        unit = F.normalize(features, dim=1)
        dist = 2 - 2 * unit @ unit.t()
    else:
        sq = (features * features).sum(dim=1)
        dist = (sq[:, None] + sq[None, :] - 2 * features @ features.t()).clamp(min=1e-12).sqrt()
    is_pos = _same_label(targets)
    is_neg = 1 - is_pos
    if hard_mining:
        d_ap = (dist * is_pos).max(dim=1)[0]
        d_an = (dist * is_neg + is_pos * 1e9).min(dim=1)[0]
    else:
        pos, neg = dist * is_pos, dist * is_neg
        d_ap = (pos * _softmax_weights(pos, is_pos)).sum(dim=1)
        d_an = (neg * _softmax_weights(-neg, is_neg)).sum(dim=1)
    ones = torch.ones_like(d_an)
    if margin > 0:
        return F.margin_ranking_loss(d_an, d_ap, ones, margin=margin)
    loss = F.soft_margin_loss(d_an - d_ap, ones)
    if torch.isinf(loss):
        return F.margin_ranking_loss(d_an, d_ap, ones, margin=0.3)
    return loss


def _pair_masks(targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    same = _same_label(targets)
    return same - torch.eye(len(targets), device=targets.device), 1 - same


def pairwise_circle_loss(features: torch.Tensor, targets: torch.Tensor, margin: float, gamma: float) -> torch.Tensor:
    """fast-reid ``pairwise_circleloss`` (Sun et al., CVPR 2020) on cosine similarities, self-pairs left out."""
    unit = F.normalize(features, dim=1)
    sim = unit @ unit.t()
    is_pos, is_neg = _pair_masks(targets)
    s_p, s_n = sim * is_pos, sim * is_neg
    alpha_p = (-s_p.detach() + 1 + margin).clamp(min=0)
    alpha_n = (s_n.detach() + margin).clamp(min=0)
    logit_p = -gamma * alpha_p * (s_p - (1 - margin)) + _MASKED * (1 - is_pos)
    logit_n = gamma * alpha_n * (s_n - margin) + _MASKED * (1 - is_neg)
    return F.softplus(torch.logsumexp(logit_p, dim=1) + torch.logsumexp(logit_n, dim=1)).mean()


def pairwise_cosface(features: torch.Tensor, targets: torch.Tensor, margin: float, gamma: float) -> torch.Tensor:
    """fast-reid ``pairwise_cosface``: ``softplus(logsumexp(-g s_p) + logsumexp(g (s_n + m)))``, self-pairs left out."""
    unit = F.normalize(features, dim=1)
    sim = unit @ unit.t()
    is_pos, is_neg = _pair_masks(targets)
    logit_p = -gamma * sim * is_pos + _MASKED * (1 - is_pos)
    logit_n = gamma * (sim * is_neg + margin) + _MASKED * (1 - is_neg)
    return F.softplus(torch.logsumexp(logit_p, dim=1) + torch.logsumexp(logit_n, dim=1)).mean()


class LabelSmoothingCrossEntropy(nn.Module):
    """:func:`cross_entropy` times ``scale`` on plain logits (CE.EPSILON, CE.ALPHA, CE.SCALE)."""

    def __init__(self, epsilon: float = 0.1, scale: float = 1.0, alpha: float = 0.2):
        super().__init__()
        if epsilon >= 1.0:
            raise ValueError(f"epsilon must be below 1, got {epsilon}")
        self.epsilon, self.scale, self.alpha = epsilon, scale, alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``logits [N, C]``, ``targets [N]`` -> scalar."""
        return cross_entropy(logits.float(), targets, self.epsilon, self.alpha) * self.scale


class FastRetriLoss(nn.Module):
    """The sum of the losses ``MODEL.LOSSES.NAME`` lists, as fast-reid's ``Baseline.losses`` computes them;
    ``forward(output, targets)`` returns ``(total, {loss name: value})`` (fast-reid's loss_dict names)."""

    def __init__(self, cfg: Mapping):
        super().__init__()
        heads, losses = cfg["MODEL"]["HEADS"], cfg["MODEL"]["LOSSES"]
        self.names: Sequence[str] = list(losses["NAME"])
        self.cls = (heads["CLS_LAYER"], heads["SCALE"], heads["MARGIN"])
        self.neck_feat = heads["NECK_FEAT"]
        self.cfg = losses

    def forward(self, out, targets: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.cfg
        parts: Dict[str, torch.Tensor] = {}
        if "CrossEntropyLoss" in self.names:
            outputs = classifier_outputs(upcast(out.logits), targets, *self.cls)
            parts["loss_cls"] = cross_entropy(outputs, targets, c["CE"]["EPSILON"], c["CE"]["ALPHA"]) * c["CE"]["SCALE"]
        features = upcast(out.pooled if self.neck_feat == "before" else out.embedding)
        if "TripletLoss" in self.names:
            t = c["TRI"]
            parts["loss_triplet"] = (
                triplet_loss(features, targets, t["MARGIN"], t["NORM_FEAT"], t["HARD_MINING"]) * t["SCALE"]
            )
        if "CircleLoss" in self.names:
            k = c["CIRCLE"]
            parts["loss_circle"] = pairwise_circle_loss(features, targets, k["MARGIN"], k["GAMMA"]) * k["SCALE"]
        if "Cosface" in self.names:
            k = c["COSFACE"]
            parts["loss_cosface"] = pairwise_cosface(features, targets, k["MARGIN"], k["GAMMA"]) * k["SCALE"]
        return sum(parts.values()), parts
