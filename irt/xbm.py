"""Cross-batch memory (XBM, Wang et al. CVPR 2020) and the MoCo-style momentum key encoder used by IRT.

XBM keeps the detached embeddings of recent batches so the contrastive loss also pairs the current batch with up
to ``size`` past samples. As in the original, the batch is enqueued before the memory term is computed, so the
memory always holds the current batch. Two changes from the original implementation:

* the ring wraps around: a batch crossing the end is split over the tail and the head (the original wrote it into
  the last ``b`` slots and restarted at 0, overwriting entries younger than the oldest one);
* without a momentum encoder the stored copy of a sample is its own detached embedding (s = 1 up to rounding, a
  zero-loss "positive" that only dilutes the non-zero averaging), so ``self_pairs`` masks it: batch row i against
  the slot row i was just written to, by position alone. A batch that draws one image twice (two crops) keeps
  both cross pairs, genuine positives as in the original. With a momentum encoder the copy is the key encoder's
  embedding of the same image, a genuine query-key positive the original trained on (MoCo style): it is kept.
"""

import copy
from typing import Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["XBM", "MomentumEncoder"]


class XBM(nn.Module):
    """FIFO ring of ``size`` (features, labels) entries, stored as buffers (checkpointed)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"XBM size must be positive, got {size}")
        self.size = size
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Write a batch at the pointer, wrapping around the end; a batch longer than the ring keeps its tail.
        Returns the slot each batch row went to (-1 for rows that did not fit), for ``self_pairs``."""
        b = len(feats)
        kept = min(b, self.size)
        slots = torch.full((b,), -1, dtype=torch.long, device=self.feats.device)
        slots[b - kept :] = (int(self.ptr) + torch.arange(kept, device=self.feats.device)) % self.size
        self.feats[slots[b - kept :]] = feats.detach()[b - kept :].to(self.feats.dtype)
        self.labels[slots[b - kept :]] = labels[b - kept :].to(self.labels.device)
        self.ptr.fill_((int(self.ptr) + kept) % self.size)
        self.count.fill_(min(self.size, int(self.count) + kept))
        return slots

    def get(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The filled entries (all of them once full): features, labels."""
        n = int(self.count)
        return self.feats[:n], self.labels[:n]

    def self_pairs(self, slots: torch.Tensor, momentum_encoder: bool = False) -> Optional[torch.Tensor]:
        """(B, n) mask of the pairs (batch row i, the slot ``slots[i]`` that ``enqueue`` just wrote it to) to leave
        out of the loss; None with a momentum encoder, whose copy is a different encoder's view: a real positive,
        as in the original."""
        if momentum_encoder:
            return None
        n = int(self.count)
        return slots.to(self.feats.device)[:, None] == torch.arange(n, device=self.feats.device)[None, :]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # per-slot dataset indices and steps of the earlier checkpoint layout: the position mask needs neither
        for key in ("indices", "steps"):
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MomentumEncoder(nn.Module):
    """Key encoder theta_k <- m * theta_k + (1 - m) * theta_q after every optimizer step (MoCo, He et al. 2020).

    A frozen copy of the query model. Like the original it stays in train mode (drop-path on), so a distilled model
    with ``distilled_embedding="original"`` yields the CLS token, as the original's key encoder did.
    """

    def __init__(self, query: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"encoder momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.encoder = copy.deepcopy(query)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, query: nn.Module) -> None:
        m = self.momentum
        for k, q in zip(self.encoder.parameters(), query.parameters()):
            k.mul_(m).add_(q.detach(), alpha=1.0 - m)
        for k, q in zip(self.encoder.buffers(), query.buffers()):
            k.copy_(q)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.encoder.train()
        return self.encoder(x)

    def state(self) -> Dict[str, torch.Tensor]:
        return self.encoder.state_dict()
