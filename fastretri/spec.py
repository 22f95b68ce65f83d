"""FastRetri as the shared test / inference / ablation / export code sees it (configs stored flat:
``{"MODEL.BACKBONE.NAME": ..., "DATASETS.NAMES": [...], "num_classes": C}``)."""

from pathlib import Path
from typing import Any, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.spec import MethodSpec
from fastretri.config import DEFAULTS, MODEL_KEYS, config_dict, data_name, fastreid_run_config, run_files, unflatten
from fastretri.data import build_transforms
from fastretri.model import build_model, load_fastreid_model

__all__ = ["SPEC", "embed"]


def fastreid_cfg(config: Mapping[str, Any]) -> dict:
    """The nested fast-reid config of a stored (flat) run configuration; the lower-case keys this toolkit stores
    beside it (num_classes, method, model_file, original_file ...) are not config keys."""
    return unflatten({k: v for k, v in config.items() if k.split(".")[0] in DEFAULTS})


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The BNNeck output, L2-normalised (fast-reid evaluates cosine similarity of normalised features)."""
    return F.normalize(model(images), dim=1)


def _model(config: Mapping[str, Any]) -> nn.Module:
    return build_model(fastreid_cfg(config), int(config["num_classes"]), "none")


FASTREID_CONFIG = "config.yaml"  # what fast-reid's default_setup writes into OUTPUT_DIR, beside model_final.pth


def import_fastreid(path, args) -> Tuple[dict, nn.Module]:
    """A fast-reid ``model_final.pth`` (no stored configuration) for test.py, inference.py, export.py and the
    databases ablation.py compares. Its FastRetri config is the one ``--eval-only`` passes along
    (``args.fastreid_cfg``), else the ``config.yaml`` fast-reid wrote beside the model file (fast-reid's full dump,
    or a config of this toolkit put there); the stored configuration records the file (``original_file``), so a
    database embedded with it finds it again."""
    path = Path(path)
    cfg = getattr(args, "fastreid_cfg", None)
    if cfg is None:
        beside = path.parent / FASTREID_CONFIG
        if not beside.is_file():
            raise UserError(
                f"{path} has no stored configuration (a fast-reid file?) and no fast-reid {FASTREID_CONFIG} "
                f"beside it: copy the run's OUTPUT_DIR/{FASTREID_CONFIG} there, or evaluate it with "
                f"python fastretri/train.py --config-file CONFIG --eval-only MODEL.WEIGHTS {path}"
            )
        cfg = fastreid_run_config(beside)
    model = load_fastreid_model(cfg, str(path))
    config = {
        **config_dict(cfg),
        "num_classes": model.classifier.weight.shape[0],
        "method": "fastretri",
        "original_file": str(path.resolve()),
    }
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
    transform=lambda config, train: build_transforms(fastreid_cfg(config))[0 if train else 1],
    run_name=lambda config: run_files(fastreid_cfg(config)).name,
    dataset=_dataset,
    default_data_base="cub_uncropped_resnet50_data_base.pth",
    default_recalls="1,2,4,8,16,32",
    import_original=import_fastreid,
)
