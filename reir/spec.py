"""REIR as the shared test / inference / ablation code sees it, and the *settings* its scripts run in.

A :class:`Setting` is everything that differs between REIR and a variant that reuses its model, loss and loop
(a results folder and transform preset, a run name, flags fixed to one value, defaults). ``reir/`` defines REIR's
own setting; a variant builds its own and passes it to :func:`method_spec` and :mod:`reir.engine`.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple

from torch import nn

from common.presets import build_transform
from common.runs import run_name
from common.spec import MethodSpec
from reir.model import Model, ensemble_embed
from reir.originals import import_reir, reir_database

__all__ = ["MODEL_KEYS", "Setting", "REIR", "SPEC", "method_spec", "reir_run_name", "model_from_config"]

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


@dataclass(frozen=True)
class Setting:
    """One way of running REIR's ensemble.

    * ``name``: results folder ``results/<name>/``, transform preset, the ``method`` stored in every file;
    * ``run_name(config)``: the original's run name;
    * ``fixed``: flags this setting does not expose, with their values (e.g. ``share_type``);
    * ``defaults``: training parser defaults (``data_name``, ``batch_size``, ``num_epochs``, ``recalls``);
    * ``default_data_base`` / ``ablation``: the test, inference and ablation scripts' default databases;
    * ``import_original`` / ``original_database``: readers of the original project's own files
      (``reir.originals``; ``MethodSpec``'s hooks of the same names).
    """

    name: str
    display: str
    run_name: Callable[[Mapping[str, Any]], str]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_data_base: str = ""
    ablation: Tuple[str, str] = ("", "")
    import_original: Optional[Callable[..., Any]] = None
    original_database: Optional[Callable[..., Any]] = None


REIR = Setting(
    name="reir",
    display="REIR",
    run_name=reir_run_name,
    defaults={"data_name": "car", "batch_size": 10, "num_epochs": 20, "recalls": "1,2,4,8"},
    default_data_base="car_uncropped_fixed_random_layer1_resnet18_48_12_data_base.pth",
    ablation=(
        "car_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth",
        "car_uncropped_random_unrandom_layer1_resnet18_48_12_data_base.pth",
    ),
    import_original=import_reir,
    original_database=reir_database,
)


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The untrained ensemble of a stored run configuration, on one device (CPU; the caller moves it)."""
    return Model(
        config["model_type"],
        config["share_type"],
        config["ensemble_size"],
        config["meta_class_size"],
        with_random=config["with_random"],
        pretrained="none",
    )


def method_spec(setting: Setting) -> MethodSpec:
    """The :class:`MethodSpec` of a setting: cosine ranking with scale E (mean per-learner cosine), 256 px renders."""

    def transform(config: Mapping[str, Any], train: bool):
        return build_transform(setting.name, train, config["data_name"], config["crop_type"], config.get("image_size"))

    return MethodSpec(
        name=setting.name,
        display=setting.display,
        metric="cosine",
        model_keys=MODEL_KEYS,
        build_model=model_from_config,
        embed=ensemble_embed,
        transform=transform,
        run_name=setting.run_name,
        scale=lambda config: float(config["ensemble_size"]),
        render_size=(256, 256),
        frame_width=8,
        default_data_base=setting.default_data_base,
        default_recalls=setting.defaults.get("recalls", "1,2,4,8"),
        import_original=setting.import_original,
        original_database=setting.original_database,
    )


SPEC = method_spec(REIR)
