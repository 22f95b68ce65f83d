"""CGD as the shared test / inference / ablation / export code sees it."""

from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

from torch import nn

from cgd.model import MODEL_KEYS, embed, model_from_config
from cgd.transforms import cgd_transform
from common.errors import UserError
from common.originals import load_original_state, original_database, split_name, strict_load
from common.runs import run_name
from common.spec import MethodSpec

__all__ = ["SPEC", "cgd_run_name"]


def cgd_run_name(config: Mapping[str, Any]) -> str:
    """leftthomas/CGD's ``<data>_<crop>_<backbone>_<gd>_<dim>_<smoothing>_<temperature>_<margin>_<batch>``."""
    return run_name(
        config["data_name"],
        config["crop_type"],
        config["backbone_type"],
        config["gd_config"],
        config["feature_dim"],
        config["smoothing"],
        config["temperature"],
        config["margin"],
        config["batch_size"],
    )


def original_config(path: Path, suffix: str) -> Dict[str, Any]:
    """The settings leftthomas/CGD encoded in a file name (``cgd_run_name``'s fields, in order)."""
    fields = split_name(path, suffix)
    if len(fields) != 9:
        raise UserError(
            f"{Path(path).name}: expected <data>_<crop>_<backbone>_<gd>_<dim>_<smoothing>_<temperature>_"
            f"<margin>_<batch>{suffix}, as leftthomas/CGD names its files"
        )
    data, crop, backbone, gd, dim, smoothing, temperature, margin, batch = fields
    try:
        return {
            "data_name": data,
            "crop_type": crop,
            "backbone_type": backbone,
            "gd_config": gd,
            "feature_dim": int(dim),
            "smoothing": float(smoothing),
            "temperature": float(temperature),
            "margin": float(margin),
            "batch_size": int(batch),
            "image_size": None,
            "method": "cgd",
        }
    except ValueError:
        raise UserError(f"{Path(path).name}: cannot read the settings from the file name") from None


def import_original(path: Path, args: Any = None) -> Tuple[Dict[str, Any], nn.Module]:
    """leftthomas/CGD's ``<run>_model.pth`` (a plain state dict with this toolkit's key names)."""
    state = load_original_state(path)
    config = original_config(path, "_model.pth")
    if "auxiliary_module.1.weight" not in state:
        raise UserError(f"{path} holds no CGD weights (no auxiliary_module.1.weight)")
    config["num_classes"] = int(state["auxiliary_module.1.weight"].shape[0])
    return config, strict_load(model_from_config(config), state, f"model {path}")


def _original_database(path: Path):
    return original_database(path, original_config(path, "_data_base.pth"), "cgd", "euclidean", lambda c: 1.0)


def transform(config: Mapping[str, Any], train: bool):
    """CGD's preset (:func:`cgd.transforms.cgd_transform`) at the run's ``image_size`` (any dataset, crop type)."""
    return cgd_transform(train, config.get("image_size"))


SPEC = MethodSpec(
    name="cgd",
    display="CGD",
    metric="euclidean",
    model_keys=MODEL_KEYS,
    build_model=model_from_config,
    embed=embed,
    transform=transform,
    run_name=cgd_run_name,
    default_data_base="car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128_data_base.pth",
    default_recalls="1,2,4,8",
    import_original=import_original,
    original_database=_original_database,
)
