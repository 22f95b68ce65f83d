"""A tiny *processed* dataset written straight into the index format, for fast end-to-end tests.

(The raw-archive fakes that exercise ``data_utils.py`` live in ``tests/fakes.py``.) Classes differ by colour and
stripe direction so that even a few CPU steps change the embedding.
"""

import json
import shlex
from pathlib import Path
from typing import Dict, List, Union

import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, cls: int, size: int) -> Image.Image:
    base = np.array([(cls * 53) % 256, (cls * 97) % 256, (cls * 151) % 256], dtype=np.float32)
    img = np.tile(base, (size, size, 1)) + rng.normal(0, 20, (size, size, 3))
    stripes = (np.arange(size)[:, None] + (cls % 3) * np.arange(size)[None, :]) % 8 < 4
    img[stripes] *= 0.5
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_tiny_processed(
    root: Path, name: str = "cub", num_classes: int = 8, per_class: int = 6, size: int = 40, seed: int = 0
) -> Path:
    """Write ``root/<name>/{images/..., uncropped_index.json, cropped_index.json}``; returns ``root``.

    ``name='isc'`` gives train / query / gallery splits (query and gallery share item ids), any other name
    gives train / test with the first half of the classes for training.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    splits: Dict[str, List[List[str]]] = {}
    for cls in range(1, num_classes + 1):
        for j in range(per_class):
            rel = f"images/{cls:03d}.class{cls}/img_{cls}_{j}.jpg"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            _image(rng, cls, size).save(folder / rel, quality=95)
            label = f"id_{cls:08d}" if name == "isc" else str(cls)
            if cls <= num_classes // 2:
                split = "train"
            elif name == "isc":
                split = "query" if j % 2 == 0 else "gallery"
            else:
                split = "test"
            splits.setdefault(split, []).append([rel, label])
    for crop in ("uncropped", "cropped"):
        index = {"format": 1, "dataset": name, "crop_type": crop, "splits": splits}
        (folder / f"{crop}_index.json").write_text(json.dumps(index))
    return Path(root)


def tiny_args(data: Union[str, Path], name: str, options: str = "") -> List[str]:
    """``--data_path data --data_name name``, an untrained backbone, no loader workers, then ``options`` split as a
    shell splits them: a tiny training run's command line in a line or two, not a token a line."""
    untrained = ["--pretrained", "none", "--num_workers", "0"]
    return ["--data_path", str(data), "--data_name", name, *untrained, *shlex.split(options)]


# An untrained CGD run (model file + a database beside it, as cgd/train.py writes them), for the shared scripts.
CGD_RUN = "cub_uncropped_resnet18_SG_32_0.1_0.5_0.1_8"
CGD_CONFIG = {
    "data_name": "cub",
    "crop_type": "uncropped",
    "backbone_type": "resnet18",
    "gd_config": "SG",
    "feature_dim": 32,
    "num_classes": 4,
    "image_size": 32,
    "smoothing": 0.1,
    "temperature": 0.5,
    "margin": 0.1,
    "batch_size": 8,
    "method": "cgd",
}


def make_untrained_cgd_run(folder: Path) -> Path:
    """Write ``<folder>/<CGD_RUN>_{model,data_base}.pth`` (seeded weights, a one-image placeholder database)."""
    import torch

    from cgd.model import model_from_config
    from common.database import Split, save_database
    from common.runio import atomic_save

    torch.manual_seed(0)
    state = {"model": model_from_config(CGD_CONFIG).state_dict(), "config": CGD_CONFIG, "epoch": 1}
    atomic_save(state, Path(folder) / f"{CGD_RUN}_model.pth")
    save_database(
        Path(folder) / f"{CGD_RUN}_data_base.pth",
        config=CGD_CONFIG,
        method="cgd",
        metric="euclidean",
        splits={"test": Split(["x.jpg"], [0], torch.zeros(1, 32))},
    )
    return Path(folder)
