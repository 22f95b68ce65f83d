"""SREML (Squeezed Randomized Ensembles for Metric Learning) as a setting of REIR: REIR's model, loss and loop with
the stem and layer1 shared, random meta-classes, no random branch weights, SREML's transform (Resize((256, 256))
+ flip), batch 12, the long recall list and the run name ``<data>_<crop>_<model>``."""

from typing import Any, Mapping

from common.runs import run_name
from reir.originals import import_sreml
from reir.spec import Setting, method_spec

__all__ = ["SETTING", "SPEC", "sreml_run_name"]

SREML_RECALLS = "1,2,4,8,10,20,30,40,50,100,1000"


def sreml_run_name(config: Mapping[str, Any]) -> str:
    """The original SREML's ``<data>_<crop>_<model>``."""
    return run_name(config["data_name"], config["crop_type"], config["model_type"])


SETTING = Setting(
    name="sreml",
    display="SREML",
    run_name=sreml_run_name,
    fixed={"label_type": "random", "share_type": "layer1", "with_random": False},
    defaults={"data_name": "car", "batch_size": 12, "num_epochs": 20, "recalls": SREML_RECALLS},
    default_data_base="car_uncropped_resnet18_data_base.pth",
    ablation=("car_uncropped_resnet34_data_base.pth", "car_uncropped_resnet18_data_base.pth"),
    import_original=import_sreml,  # the original SREML saved no database: original_database stays None
)

SPEC = method_spec(SETTING)
