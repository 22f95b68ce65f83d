"""REIR as the shared test / inference / ablation code and its training script see it: one :class:`MethodSpec`.

A variant that reuses REIR's model, loss and loop (SREML) is ``dataclasses.replace(SPEC, ...)`` with its own name,
run name, transform, ``fixed`` flags and defaults; ``reir.recipe`` builds a run from either spec.
"""

from typing import Any, Mapping, Optional

from torchvision import transforms as T

from common.presets import DATASET_STATS, IMAGENET_MEAN, IMAGENET_STD, normalized, scaled
from common.runs import run_name
from common.spec import MethodSpec
from reir.model import ensemble_embed, model_from_config
from reir.originals import import_reir, reir_database

__all__ = ["MODEL_KEYS", "SPEC", "reir_transform", "reir_run_name"]

# Configuration a model file / database must match to be used with these flags.
MODEL_KEYS = (
    "method",
    "data_name",
    "crop_type",
    "label_type",
    "with_random",
    "share_type",
    "model_type",
    "ensemble_size",
    "meta_class_size",
    "image_size",
)


def reir_run_name(config: Mapping[str, Any]) -> str:
    """REIR's ``<data>_<crop>_<label>_<random|unrandom>_<share>_<model>_<E>_<M>``."""
    return run_name(
        config["data_name"],
        config["crop_type"],
        config["label_type"],
        "random" if config["with_random"] else "unrandom",
        config["share_type"],
        config["model_type"],
        config["ensemble_size"],
        config["meta_class_size"],
    )


def reir_transform(train: bool, data_name: str, crop_type: str, image_size: Optional[int] = None) -> T.Compose:
    """REIR: uncropped Resize(256) -> RandomCrop(256) -> flip / Resize(256) -> CenterCrop(256);
    cropped Resize((256,256)) (+ flip); per-dataset statistics."""
    s = scaled(256, 256, image_size)
    if crop_type == "cropped":
        ops = [T.Resize((s, s))] + ([T.RandomHorizontalFlip()] if train else [])
    elif train:
        ops = [T.Resize(s), T.RandomCrop(s), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(s), T.CenterCrop(s)]
    return normalized(ops, *DATASET_STATS.get(data_name, (IMAGENET_MEAN, IMAGENET_STD)))


# Cosine ranking with scale E (the mean per-learner cosine), 256 px renders.
SPEC = MethodSpec(
    name="reir",
    display="REIR",
    metric="cosine",
    model_keys=MODEL_KEYS,
    build_model=model_from_config,
    embed=ensemble_embed,
    transform=lambda config, train: reir_transform(
        train, config["data_name"], config["crop_type"], config.get("image_size")
    ),
    run_name=reir_run_name,
    scale=lambda config: float(config["ensemble_size"]),
    render_size=(256, 256),
    frame_width=8,
    default_data_base="car_uncropped_fixed_random_layer1_resnet18_48_12_data_base.pth",
    default_recalls="1,2,4,8",
    import_original=import_reir,
    original_database=reir_database,
)
