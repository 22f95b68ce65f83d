"""The building blocks every method's transform preset shares (torchvision ``presets.py`` style).

Each method's own preset lives in its folder (``cgd/transforms.py``, ``reir/spec.py``, ``sreml/spec.py``,
``irt/transforms.py``, ``fastretri/transforms.py``) and is reached through ``SPEC.transform(config, train)``.
``image_size`` rescales a CNN preset proportionally (e.g. CGD 252->224 becomes 72->64 for ``--image_size 64``),
which is what the demo quickstart and the CPU tests use.
"""

from typing import Optional, Sequence

from torchvision import transforms as T

from common.data.normalize import ToNormalizedTensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DATASET_STATS", "scaled", "normalized"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-dataset statistics used by REIR/SREML (from DREML's colour table); demo falls back to ImageNet's.
DATASET_STATS = {
    "car": ((0.4853, 0.4965, 0.4295), (0.2237, 0.2193, 0.2568)),
    "cub": ((0.4707, 0.4601, 0.4549), (0.2767, 0.2760, 0.2850)),
    "sop": ((0.5807, 0.5396, 0.5044), (0.2901, 0.2974, 0.3095)),
    "isc": ((0.8324, 0.8109, 0.8041), (0.2206, 0.2378, 0.2444)),
}


def scaled(size: int, base: int, image_size: Optional[int]) -> int:
    """``size`` of a preset whose reference crop is ``base``, rescaled to ``image_size``."""
    return size if image_size is None else max(1, round(size * image_size / base))


def normalized(ops: list, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The preset: ``ops``, then ToTensor + Normalize(mean, std) fused into one bit-identical pass
    (``common.data.normalize``)."""
    return T.Compose(ops + [ToNormalizedTensor(mean, std)])
