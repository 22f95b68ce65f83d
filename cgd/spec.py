"""CGD as the shared test / inference / ablation / export code sees it."""
from typing import Any, Mapping

from cgd.model import MODEL_KEYS, embed, model_from_config
from common.presets import build_transform
from common.runio import run_name
from common.spec import MethodSpec

__all__ = ["SPEC", "cgd_run_name"]


def cgd_run_name(config: Mapping[str, Any]) -> str:
    """leftthomas/CGD's ``<data>_<crop>_<backbone>_<gd>_<dim>_<smoothing>_<temperature>_<margin>_<batch>``."""
    return run_name(config["data_name"], config["crop_type"], config["backbone_type"], config["gd_config"],
                    config["feature_dim"], config["smoothing"], config["temperature"], config["margin"],
                    config["batch_size"])


def _eval_transform(config: Mapping[str, Any]):
    return build_transform("cgd", False, config["data_name"], config["crop_type"], config.get("image_size"))


SPEC = MethodSpec(
    name="cgd",
    display="CGD",
    metric="euclidean",
    model_keys=MODEL_KEYS,
    build_model=model_from_config,
    embed=embed,
    eval_transform=_eval_transform,
    run_name=cgd_run_name,
    default_data_base="car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128_data_base.pth",
    default_recalls="1,2,4,8",
)
