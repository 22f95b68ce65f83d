"""Global pooling layers shared by the methods (GeM of Radenović et al., TPAMI 2018).

Shared implementation so CGD (its GD = GeM with p=3) and FastRetri (fastreid ``GeneralizedMeanPooling``) pool the
same way: clamp at ``eps`` before the power so that ``x ** (1/p)`` never sees zeros or negatives (ReLU output can
be exactly 0, whose cube root has an infinite gradient).
"""

import torch
from torch import nn

__all__ = ["GeM"]


class GeM(nn.Module):
    """Generalised mean pooling: ``(mean(clamp(x, eps) ** p)) ** (1/p)`` over H, W -> ``[N, C]``.

    p=1 is average pooling (SPoC), p -> inf is max pooling (MAC). ``learnable=True`` makes p a parameter
    (fastreid's ``GeneralizedMeanPoolingP``); FastRetri and CGD keep it fixed at 3.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False):
        super().__init__()
        self.eps = eps
        p_tensor = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # half precision is computed in float32 (under fp16 autocast x ** 3 overflows for activations above ~40);
        # float32 and float64 inputs keep their precision
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        pooled = xc.clamp(min=self.eps).pow(self.p.to(xc.dtype)).mean(dim=(-2, -1)).pow(1.0 / self.p.to(xc.dtype))
        return pooled.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()):.2f}, eps={self.eps}, learnable={isinstance(self.p, nn.Parameter)}"
