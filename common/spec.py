"""What the shared test / inference / ablation / export code needs to know of a method: one small object each.

A method's ``spec.py`` builds a :class:`MethodSpec`; ``common.scripts`` implements ``test.py``, ``inference.py``
and ``ablation.py`` once on top of it (``common.runs`` loads the runs), so the five methods share one contract
(files, columns, flags) and one set of bugs to fix.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ["MethodSpec", "default_dataset"]

Config = Mapping[str, Any]


def default_dataset(config: Config) -> Tuple[str, str]:
    """``(data_name, crop_type)`` of a run configuration stored with ``--data_name`` / ``--crop_type`` flags."""
    return config["data_name"], config.get("crop_type", "uncropped")


def _unit_scale(config: Config) -> float:
    return 1.0


@dataclass(frozen=True)
class MethodSpec:
    """A method as the shared scripts see it.

    * ``build_model(config)``: the untrained network of a stored run configuration (no weight download), into which
      a ``<run>_model.pth`` state dict loads strictly;
    * ``embed(model, images)``: normalised image batch -> the embedding the method retrieves with;
    * ``transform(config, train)``: PIL image -> normalised tensor, the method's training or evaluation preset
      (defined in the method's folder, so that a new method edits no shared file);
    * ``run_name(config)``: the original's run name (``<run>_model.pth``, ``<run>_data_base.pth``);
    * ``metric``: ``euclidean`` (distance, smaller first; CGD) or ``cosine`` (score, larger first), with
      ``scale(config)`` dividing inner products (REIR: E unit vectors concatenated -> mean per-learner cosine);
    * ``model_keys``: configuration keys that define the model; files that differ on them are refused;
    * ``import_original`` / ``original_database``: read the original project's files (no stored configuration);
    * ``fixed``: configuration values a method holds fixed, with no training flag for them (a variant of another
      method's model, e.g. SREML's ``share_type``), set in every run configuration it trains.
    """

    name: str
    display: str
    metric: str
    model_keys: Tuple[str, ...]
    build_model: Callable[[Config], nn.Module]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    transform: Callable[[Config, bool], Callable]
    run_name: Callable[[Config], str]
    dataset: Callable[[Config], Tuple[str, str]] = default_dataset
    scale: Callable[[Config], float] = _unit_scale
    render_size: Tuple[int, int] = (224, 224)
    frame_width: int = 8
    default_data_base: str = ""
    default_recalls: str = "1,2,4,8"
    import_original: Optional[Callable[..., Any]] = None  # (model file, args) -> (config, model), original's file
    original_database: Optional[Callable[..., Any]] = None  # database file -> Database, original's layout
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def eval_transform(self, config: Config) -> Callable:
        """The evaluation preset of a run configuration (test, inference, galleries, export, the service)."""
        return self.transform(config, False)

    def model_config(self, config: Config) -> dict:
        """The model-defining part of a configuration (what a model file and a database must share)."""
        return {k: config.get(k) for k in self.model_keys}
