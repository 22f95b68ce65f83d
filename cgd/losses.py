"""CGD's two losses: temperature-scaled label-smoothing cross-entropy (auxiliary classifier) and batch-hard
triplet (ranking loss on the combined embedding), summed 1:1 by the training loop."""

import torch
import torch.nn.functional as F
from torch import nn

from common.device import upcast

__all__ = ["LabelSmoothingCrossEntropyLoss", "BatchHardTripletLoss"]


class LabelSmoothingCrossEntropyLoss(nn.Module):
    """Cross-entropy of softmax(z / T) against soft targets (1 - eps) * onehot(y) + eps / C.

    Per sample: (1 - eps) * (-log p_y) + eps * mean_j(-log p_j); CGD uses eps = 0.1 and T = 0.5
    (temperature scaling from Zhai & Wu 2018, label smoothing from Szegedy et al. 2016).
    """

    def __init__(self, smoothing: float = 0.1, temperature: float = 0.5):
        super().__init__()
        if not 0.0 <= smoothing < 1.0 or temperature <= 0.0:
            raise ValueError("need 0 <= smoothing < 1 and temperature > 0")
        self.smoothing, self.temperature = smoothing, temperature

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # (B, C), (B,) -> scalar
        log_p = F.log_softmax(upcast(logits) / self.temperature, dim=-1)
        nll = -log_p.gather(-1, labels[:, None]).squeeze(-1)
        uniform = -log_p.mean(dim=-1)
        return ((1.0 - self.smoothing) * nll + self.smoothing * uniform).mean()


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances: mean_i [d(i, p_i) - d(i, n_i) + m]_+,
    with p_i the farthest same-label and n_i the nearest other-label sample in the batch.

    Only anchors that have both a positive and a negative in the batch are averaged (the original also
    averaged anchors without a positive, counting d+ = 0, which dilutes the loss); no valid anchor gives 0.
    """

    def __init__(self, margin: float = 0.1):
        super().__init__()
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # (B, D), (B,) -> scalar
        dist = _euclidean(upcast(embeddings))
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive, negative = same & ~eye, ~same
        valid = positive.any(dim=1) & negative.any(dim=1)
        if not valid.any():
            return embeddings.sum() * 0.0
        hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
        hardest_neg = dist.masked_fill(~negative, float("inf")).amin(dim=1)
        losses = F.relu(hardest_pos - hardest_neg + self.margin)
        return losses[valid].mean()


def _euclidean(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances with a finite gradient on the diagonal (cdist's sqrt(0) has none)."""
    norms = x.pow(2).sum(dim=1)
    squared = norms[:, None] + norms[None, :] - 2.0 * x @ x.t()
    return squared.clamp(min=1e-12).sqrt()
