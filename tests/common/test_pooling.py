"""GeM against its formula, computed independently in numpy float64."""

import numpy as np
import torch

from common.pooling import GeM


def _reference(x: np.ndarray, p: float, eps: float) -> np.ndarray:
    return np.power(np.power(np.maximum(x, eps), p).mean(axis=(-2, -1)), 1.0 / p)


def test_float64_keeps_its_precision():
    x = torch.rand(2, 5, 7, 3, dtype=torch.float64) * 4 - 1  # negatives and values near 0 hit the clamp
    out = GeM(3.0)(x)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), _reference(x.numpy(), 3.0, 1e-6), rtol=1e-13)


def test_float32_and_p1_is_average_pooling():
    x = torch.rand(3, 4, 6, 6)
    out = GeM(1.0)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.mean(dim=(-2, -1)))


def test_half_inputs_are_pooled_in_float32_without_overflow():
    x = torch.full((1, 2, 4, 4), 60.0, dtype=torch.float16)  # 60 ** 3 overflows float16
    out = GeM(3.0)(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), torch.full((1, 2), 60.0), rtol=1e-3, atol=0)
