"""FastRetri as the shared test / inference / ablation / export code sees it (configs stored flat:
``{"MODEL.BACKBONE.NAME": ..., "DATASETS.NAMES": [...], "num_classes": C}``)."""

from typing import Any, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.spec import MethodSpec
from fastretri.config import MODEL_KEYS, config_dict, data_name, run_files, unflatten
from fastretri.data import build_transforms
from fastretri.model import build_model, load_fastreid_model

__all__ = ["SPEC", "embed"]


# keys this toolkit stores beside fast-reid's flattened config
_EXTRA_KEYS = ("num_classes", "method", "float64", "augment")


def fastreid_cfg(config: Mapping[str, Any]) -> dict:
    """The nested fast-reid config of a stored (flat) run configuration."""
    return unflatten({k: v for k, v in config.items() if k not in _EXTRA_KEYS})


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The BNNeck output, L2-normalised (fast-reid evaluates cosine similarity of normalised features)."""
    return F.normalize(model(images), dim=1)


def _model(config: Mapping[str, Any]) -> nn.Module:
    return build_model(fastreid_cfg(config), int(config["num_classes"]), "none")


def import_fastreid(path, args) -> Tuple[dict, nn.Module]:
    """A fast-reid ``model_final.pth`` (no stored configuration): the model comes from the YAML config that
    fast-reid's ``--eval-only`` passes along (``args.fastreid_cfg``)."""
    cfg = getattr(args, "fastreid_cfg", None)
    if cfg is None:
        raise UserError(
            f"{path} has no stored configuration (a fast-reid file?); evaluate it with "
            f"python fastretri/train.py --config-file CONFIG --eval-only MODEL.WEIGHTS {path}"
        )
    model = load_fastreid_model(cfg, str(path))
    config = {**config_dict(cfg), "num_classes": model.classifier.weight.shape[0], "method": "fastretri"}
    return config, model


def _dataset(config: Mapping[str, Any]) -> Tuple[str, str]:
    cfg = fastreid_cfg(config)
    return data_name(cfg), cfg["DATASETS"]["CROP_TYPE"]


SPEC = MethodSpec(
    name="fastretri",
    display="FastRetri",
    metric="cosine",
    model_keys=MODEL_KEYS + ("num_classes",),
    build_model=_model,
    embed=embed,
    eval_transform=lambda config: build_transforms(fastreid_cfg(config))[1],
    run_name=lambda config: run_files(fastreid_cfg(config)).name,
    dataset=_dataset,
    default_data_base="cub_uncropped_resnet50_data_base.pth",
    default_recalls="1,2,4,8,16,32",
    import_original=import_fastreid,
)
