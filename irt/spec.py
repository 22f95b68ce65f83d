"""IRT as the shared test / inference / ablation / export code sees it."""

from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from common.errors import UserError
from common.runs import run_name
from common.spec import MethodSpec
from irt.data import DATASET_ALIASES, ORIGINAL_NAMES
from irt.model import build_model, load_original_encoder, original_model_name, parse_model_kwargs
from irt.transforms import irt_transform

__all__ = ["SPEC", "MODEL_KEYS", "irt_run_name", "model_from_config"]

# a stored model is only reused for the same network
MODEL_KEYS = ("model", "model_kwargs", "input_size", "distilled_embedding")


def irt_run_name(config: Mapping[str, Any]) -> str:
    """``<dataset>_<crop>_<model>_<size>_<iters>_<bs>_<lambda>_<margin>_<m>_<memory>_<momentum>``."""
    kwargs = "-".join(f"{k}{v}" for k, v in parse_model_kwargs(config.get("model_kwargs")).items())
    model = config["model"] + (f"-{kwargs}" if kwargs else "")
    return run_name(
        config["data_name"],
        config.get("crop_type", "uncropped"),
        model,
        config["input_size"],
        config["max_iter"],
        config["batch_size"],
        config["lambda_reg"],
        config["margin"],
        config["m"],
        config["memory_ratio"],
        config.get("encoder_momentum") or 0,
    )


def model_from_config(config: Mapping[str, Any], pretrained: str = "none") -> nn.Module:
    """The network a stored configuration (or the training flags as a dict) describes."""
    return build_model(
        config["model"],
        pretrained,
        config["input_size"],
        config.get("drop", 0.0),
        config.get("drop_path", 0.1),
        parse_model_kwargs(config.get("model_kwargs")),
        config.get("distilled_embedding", "original"),
    )


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The L2-normalised embedding (the model's output in eval mode)."""
    return model(images)


def import_original(path: Path, args: Any = None) -> Tuple[Dict[str, Any], nn.Module]:
    """The original's ``outputs/<dataset>/encoder.pth`` (a timm state dict without configuration): the DeiT is
    recognised from the tensor shapes, the dataset from the folder name, as the original's --output-dir wrote it."""
    path = Path(path)
    data = DATASET_ALIASES.get(path.parent.name)
    if data is None:
        names = ", ".join(sorted(ORIGINAL_NAMES.values()))
        raise UserError(
            f"{path}: put the original's encoder.pth in a folder named after its dataset ({names}), "
            "as its --output-dir did: <dir>/cub200/encoder.pth"
        )
    model = load_original_encoder(str(path))
    name = original_model_name(model.backbone.state_dict())
    config = {
        "model": name,
        "model_kwargs": [],
        "input_size": 224,
        "distilled_embedding": "original",
        "drop": 0.0,
        "drop_path": 0.1,
        "data_name": data,
        "crop_type": "uncropped",
        "method": "irt",
        "original_file": str(path),
    }
    return config, model


SPEC = MethodSpec(
    name="irt",
    display="IRT",
    metric="cosine",
    model_keys=MODEL_KEYS,
    build_model=model_from_config,
    embed=embed,
    transform=lambda config, train: irt_transform(train, config["input_size"] or 224),
    run_name=irt_run_name,
    default_data_base="cub_uncropped_deit_small_distilled_patch16_224_224_2000_64_0.7_0.5_0_1.0_0_data_base.pth",
    default_recalls="1,2,4,8",
    import_original=import_original,
)
