"""SREML (Squeezed Randomized Ensembles for Metric Learning) as a variant of REIR's spec: REIR's model, loss and loop
with the stem and layer1 shared, random meta-classes, no random branch weights (``fixed``), SREML's transform
(Resize((256, 256)) + flip), the long recall list and the run name ``<data>_<crop>_<model>``."""

import dataclasses
from typing import Any, Mapping, Optional

from torchvision import transforms as T

from common.presets import DATASET_STATS, IMAGENET_MEAN, IMAGENET_STD, normalized, scaled
from common.runs import run_name
from reir.spec import SPEC as REIR_SPEC
from sreml.originals import import_sreml

__all__ = ["SPEC", "SREML_RECALLS", "sreml_run_name", "sreml_transform"]

SREML_RECALLS = "1,2,4,8,10,20,30,40,50,100,1000"


def sreml_run_name(config: Mapping[str, Any]) -> str:
    """The original SREML's ``<data>_<crop>_<model>``."""
    return run_name(config["data_name"], config["crop_type"], config["model_type"])


def sreml_transform(train: bool, data_name: str, image_size: Optional[int] = None) -> T.Compose:
    """SREML: Resize((256,256)) (+ flip in training), every dataset and crop type; per-dataset statistics."""
    s = scaled(256, 256, image_size)
    ops = [T.Resize((s, s))] + ([T.RandomHorizontalFlip()] if train else [])
    return normalized(ops, *DATASET_STATS.get(data_name, (IMAGENET_MEAN, IMAGENET_STD)))


SPEC = dataclasses.replace(
    REIR_SPEC,
    name="sreml",
    display="SREML",
    transform=lambda config, train: sreml_transform(train, config["data_name"], config.get("image_size")),
    run_name=sreml_run_name,
    default_data_base="car_uncropped_resnet18_data_base.pth",
    default_recalls=SREML_RECALLS,
    import_original=import_sreml,
    original_database=None,  # the original SREML saved no database
    fixed={"label_type": "random", "share_type": "layer1", "with_random": False},
)
