"""FastRetri configuration: fast-reid's YAML files and ``KEY VALUE`` overrides without yacs.

A config is a nested dict. :data:`DEFAULTS` lists every valid key with its default (the role of fast-reid's
``_C``); a YAML file may name a ``_BASE_`` file (relative to itself) that it overrides. Command-line ``opts`` are
dotted keys followed by values (``SOLVER.BASE_LR 0.01``), parsed as YAML and coerced to the default's type.
Unknown keys and uncoercible values are one-line :class:`UserError` s.
"""

import argparse
import ast
import copy
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from common.cli import available_cores, check_value, non_negative_float, non_negative_int, positive_int
from common.data.registry import benchmark_name
from common.errors import UserError
from common.runio import atomic_write, plain_config
from common.runs import RunFiles, results_dir, run_name
from fastretri.losses import LOSS_NAMES
from fastretri.model import BACKBONE_NORMS, CLS_LAYERS, POOL_LAYERS
from fastretri.solver import CLIP_TYPES, SCHEDULERS, WARMUP_METHODS, optimizer_class

__all__ = [
    "DEFAULTS",
    "MODEL_KEYS",
    "RESUME_FREE",
    "TRAIN_SAMPLERS",
    "load_config",
    "check_config",
    "merge_opts",
    "flatten",
    "get",
    "set_value",
    "resolve_config",
    "data_name",
    "RELEASED_CONFIGS",
    "released_config",
    "pretrained_source",
    "config_dict",
    "run_files",
    "unflatten",
    "fastreid_run_config",
    "write_config",
]

# FastRetri's base values (fast-reid's _C as projects/FastRetri/configs/base-image_retri.yml sets it); keys the
# base file leaves alone keep fast-reid's _C defaults (CE.ALPHA, TRI.*, CIRCLE.*, COSFACE.*, STEPS, GAMMA ...)
DEFAULTS: Dict[str, Any] = {
    "MODEL": {
        "WEIGHTS": "",
        "BACKBONE": {"NAME": "resnet50", "LAST_STRIDE": 1, "NORM": "FrozenBN", "PRETRAIN": True, "PRETRAIN_PATH": ""},
        "HEADS": {
            "POOL_LAYER": "GeneralizedMeanPooling",
            "GEM_P": 3.0,
            "WITH_BNNECK": True,
            "NECK_FEAT": "after",
            "CLS_LAYER": "Linear",
            "SCALE": 1.0,
            "MARGIN": 0.0,
        },
        "LOSSES": {
            "NAME": ["CrossEntropyLoss"],
            "CE": {"EPSILON": 0.1, "ALPHA": 0.2, "SCALE": 1.0},
            "TRI": {"MARGIN": 0.3, "NORM_FEAT": False, "HARD_MINING": False, "SCALE": 1.0},
            "CIRCLE": {"MARGIN": 0.25, "GAMMA": 128.0, "SCALE": 1.0},
            "COSFACE": {"MARGIN": 0.25, "GAMMA": 128.0, "SCALE": 1.0},
        },
    },
    "INPUT": {
        "SIZE_TRAIN": [256, 256],
        "SIZE_TEST": [256, 256],
        "CROP": {"ENABLED": True, "SIZE": [224], "SCALE": [0.16, 1.0], "RATIO": [0.75, 1.33333]},
        "FLIP": {"ENABLED": True, "PROB": 0.5},
        "CJ": {"ENABLED": False, "PROB": 0.5, "BRIGHTNESS": 0.15, "CONTRAST": 0.15, "SATURATION": 0.1, "HUE": 0.1},
    },
    "DATASETS": {"NAMES": ["cub"], "ROOT": "data", "CROP_TYPE": "uncropped"},
    "DATALOADER": {"SAMPLER_TRAIN": "TrainingSampler", "NUM_INSTANCE": 4, "NUM_WORKERS": 8},
    "SOLVER": {
        "AMP": {"ENABLED": True, "DTYPE": "bfloat16"},
        "COMPILE": False,  # this toolkit's: torch.compile the model (--compile)
        "OPT": "SGD",
        "MAX_EPOCH": 100,
        "BASE_LR": 0.003,
        "MOMENTUM": 0.99,
        "NESTEROV": True,
        "WEIGHT_DECAY": 0.0005,
        "WEIGHT_DECAY_BIAS": 0.0,
        "WEIGHT_DECAY_NORM": 0.0005,
        "BIAS_LR_FACTOR": 1.0,
        "SCHED": "CosineAnnealingLR",
        "DELAY_EPOCHS": 0,
        "STEPS": [30, 55],
        "GAMMA": 0.1,
        "ETA_MIN_LR": 3e-5,
        "WARMUP_FACTOR": 0.1,
        "WARMUP_ITERS": 1000,
        "WARMUP_METHOD": "linear",
        "CLIP_GRADIENTS": {"ENABLED": True, "CLIP_TYPE": "norm", "CLIP_VALUE": 5.0, "NORM_TYPE": 2.0},
        "IMS_PER_BATCH": 128,
        "CHECKPOINT_PERIOD": 10,
    },
    "TEST": {"EVAL_PERIOD": 10, "IMS_PER_BATCH": 256, "RECALLS": [1, 2, 4, 8, 16, 32], "METRIC": "cosine"},
    "SEED": 0,
    "OUTPUT_NAME": "",
}


def get(cfg: Dict[str, Any], key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _check_key(cfg: Dict[str, Any], key: str, where: str) -> None:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"unknown config key {key} ({where})")
        node = node[part]


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default`` (ints widen to floats, scalars to one-item lists)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, list):
        if isinstance(value, str) and value.strip().startswith(("(", "[")):
            value = _literal(key, value)  # fast-reid's yacs tuples: NAMES: ("Cars196",)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if default and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items):
            kind = float if any(isinstance(x, float) for x in default) else type(default[0])
            if kind is int and any(isinstance(x, float) and not x.is_integer() for x in items):
                raise UserError(f"config key {key} expects integers, got {value!r}")
            return [kind(x) for x in items]
        if not default or all(isinstance(x, str) for x in items):
            return items
    raise UserError(f"config key {key} expects {type(default).__name__}, got {value!r}")


def _literal(key: str, text: str) -> Any:
    """A Python literal such as ``("CUB",)`` (YAML reads it as a string; yacs evaluates it)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"config key {key} expects a list, got {text!r}") from None


# keys checked like the shared flags they stand for (--lr, --batch_size, --num_epochs, --num_workers, --image_size)
_BOUNDED = {
    "SOLVER.BASE_LR": non_negative_float,
    "SOLVER.IMS_PER_BATCH": positive_int,
    "SOLVER.MAX_EPOCH": non_negative_int,
    "DATALOADER.NUM_WORKERS": non_negative_int,
    "TEST.IMS_PER_BATCH": positive_int,
    "INPUT.SIZE_TRAIN": non_negative_int,  # [0]: no resize (fast-reid's In-shop config)
    "INPUT.SIZE_TEST": non_negative_int,
    "INPUT.CROP.SIZE": positive_int,
}


def set_value(cfg: Dict[str, Any], key: str, value: Any, where: str = "command line") -> None:
    _check_key(cfg, key, where)
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    if isinstance(node[last], dict):
        raise UserError(f"config key {key} is a group; set one of its keys ({', '.join(node[last])})")
    node[last] = _coerce(key, value, node[last])
    if key in _BOUNDED:
        for item in node[last] if isinstance(node[last], list) else [node[last]]:
            check_value(f"config key {key} ({where})", item, _BOUNDED[key])


def _merge(cfg: Dict[str, Any], update: Dict[str, Any], where: str, prefix: str = "") -> None:
    for k, v in update.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _check_key(cfg, key, where)
            _merge(cfg, v, where, key + ".")
        else:
            set_value(cfg, key, v, where)


def _read_yaml(path: Path, seen: Sequence[Path] = ()) -> List[tuple]:
    """[(file, dict)] from the outermost _BASE_ to ``path`` itself."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise UserError(f"config file {path} includes itself through _BASE_")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys")
    base = data.pop("_BASE_", None)
    chain = _read_yaml(path.parent / base, [*seen, path.resolve()]) if base else []
    return chain + [(path, data)]


def merge_opts(cfg: Dict[str, Any], opts: Sequence[str]) -> None:
    """Apply ``KEY VALUE KEY VALUE ...`` overrides (values parsed as YAML: ``0.01``, ``[1,2]``, ``False``)."""
    if len(opts) % 2:
        raise UserError(f"overrides come in KEY VALUE pairs; {opts[-1]} has no value")
    for key, text in zip(opts[0::2], opts[1::2]):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        set_value(cfg, key, value)


def load_config(path: Optional[str] = None, opts: Sequence[str] = ()) -> Dict[str, Any]:
    """Defaults, then the ``_BASE_`` chain of ``path``, then ``opts``."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        for file, data in _read_yaml(Path(path)):
            _merge(cfg, data, f"in {file}")
    merge_opts(cfg, list(opts))
    return cfg


def flatten(cfg: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"SOLVER.BASE_LR": 0.02, ...}``: the form stored in checkpoints and databases."""
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# keys that must match to load a model or database; everything but these bookkeeping keys must match to resume
MODEL_KEYS = (
    "MODEL.BACKBONE.NAME",
    "MODEL.BACKBONE.LAST_STRIDE",
    "MODEL.BACKBONE.NORM",
    "MODEL.HEADS.POOL_LAYER",
    "MODEL.HEADS.GEM_P",
    "MODEL.HEADS.WITH_BNNECK",
    "MODEL.HEADS.SCALE",
    "DATASETS.NAMES",
    "DATASETS.CROP_TYPE",
    "INPUT.SIZE_TEST",
    "INPUT.CROP.ENABLED",
    "INPUT.CROP.SIZE",
)
RESUME_FREE = (
    "DATALOADER.NUM_WORKERS",
    "SOLVER.MAX_EPOCH",
    "TEST.EVAL_PERIOD",
    "TEST.IMS_PER_BATCH",
    "TEST.RECALLS",
    "DATASETS.ROOT",
    "SOLVER.CHECKPOINT_PERIOD",
    "SOLVER.COMPILE",
    "MODEL.WEIGHTS",
    "OUTPUT_NAME",
)
_CLI_KEYS = {
    "data_path": "DATASETS.ROOT",
    "crop_type": "DATASETS.CROP_TYPE",
    "num_workers": "DATALOADER.NUM_WORKERS",
    "batch_size": "SOLVER.IMS_PER_BATCH",
    "num_epochs": "SOLVER.MAX_EPOCH",
    "seed": "SEED",
    "recalls": "TEST.RECALLS",
    "amp": "SOLVER.AMP.ENABLED",
    "amp_dtype": "SOLVER.AMP.DTYPE",
    "compile": "SOLVER.COMPILE",
}


TRAIN_SAMPLERS = ("TrainingSampler", "NaiveIdentitySampler", "BalancedIdentitySampler")
# values of fast-reid's that this toolkit refuses, and why (every other value outside the supported ones is
# refused with the list of those)
_REFUSED = {
    ("MODEL.BACKBONE.NORM", "GhostBN"): "ghost batch norm is not implemented",
    ("MODEL.BACKBONE.NORM", "GN"): "GroupNorm layers cannot take the ImageNet BatchNorm weights",
    ("MODEL.HEADS.POOL_LAYER", "Identity"): "it keeps the feature map, and the head would classify one corner pixel",
    ("MODEL.HEADS.POOL_LAYER", "Flatten"): "its C x H x W vector does not fit the classifier's width",
    ("DATALOADER.SAMPLER_TRAIN", "SetReWeightSampler"): "it needs camera sets (DATALOADER.SET_WEIGHT)",
    ("DATALOADER.SAMPLER_TRAIN", "ImbalancedDatasetSampler"): "it is not implemented",
    ("MODEL.LOSSES.NAME", "FocalLoss"): "fast-reid's Baseline never computes it either",
}


def _one_of(cfg: Dict, key: str, allowed: Sequence[str], value: Any = None) -> None:
    value = get(cfg, key) if value is None else value
    if value in allowed:
        return
    why = _REFUSED.get((key, value))
    raise UserError(
        f"{key} {value} is not supported" + (f": {why}" if why else "") + f" (choose from {', '.join(allowed)})"
    )


def check_config(cfg: Dict) -> None:
    """Refuse, in one line, every value this toolkit would otherwise not honour (nothing is silently ignored)."""
    _one_of(cfg, "MODEL.BACKBONE.NORM", BACKBONE_NORMS)
    _one_of(cfg, "MODEL.HEADS.POOL_LAYER", tuple(POOL_LAYERS))
    _one_of(cfg, "MODEL.HEADS.NECK_FEAT", ("before", "after"))
    _one_of(cfg, "MODEL.HEADS.CLS_LAYER", CLS_LAYERS)
    names = get(cfg, "MODEL.LOSSES.NAME")
    if not names:
        raise UserError(f"MODEL.LOSSES.NAME is empty (choose from {', '.join(LOSS_NAMES)})")
    for name in names:
        _one_of(cfg, "MODEL.LOSSES.NAME", LOSS_NAMES, name)
    if get(cfg, "MODEL.LOSSES.CE.EPSILON") >= 1:
        raise UserError("MODEL.LOSSES.CE.EPSILON must be below 1 (0 = no smoothing, < 0 = adaptive smoothing)")
    _one_of(cfg, "DATALOADER.SAMPLER_TRAIN", TRAIN_SAMPLERS)
    batch, k = get(cfg, "SOLVER.IMS_PER_BATCH"), get(cfg, "DATALOADER.NUM_INSTANCE")
    if get(cfg, "DATALOADER.SAMPLER_TRAIN") != "TrainingSampler" and (k < 1 or batch % k):
        raise UserError(
            f"SOLVER.IMS_PER_BATCH {batch} must be a multiple of DATALOADER.NUM_INSTANCE {k} for "
            f"{get(cfg, 'DATALOADER.SAMPLER_TRAIN')} (fast-reid never completes such a batch)"
        )
    if optimizer_class(get(cfg, "SOLVER.OPT")) is None:
        raise UserError(f"SOLVER.OPT {get(cfg, 'SOLVER.OPT')} is not a torch.optim optimizer (e.g. SGD, Adam, AdamW)")
    _one_of(cfg, "SOLVER.SCHED", SCHEDULERS)
    _one_of(cfg, "SOLVER.WARMUP_METHOD", WARMUP_METHODS)
    if get(cfg, "SOLVER.SCHED") == "MultiStepLR" and any(step < 1 for step in get(cfg, "SOLVER.STEPS")):
        raise UserError(f"SOLVER.STEPS {get(cfg, 'SOLVER.STEPS')} must count scheduler steps (epochs) from 1")
    _one_of(cfg, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", CLIP_TYPES)
    if get(cfg, "SOLVER.CLIP_GRADIENTS.NORM_TYPE") <= 0:
        raise UserError("SOLVER.CLIP_GRADIENTS.NORM_TYPE must be positive (2.0 = L2, .inf = largest element)")
    _one_of(cfg, "SOLVER.AMP.DTYPE", ("bfloat16", "float16"))
    if get(cfg, "TEST.METRIC") != "cosine":
        raise UserError(
            f"TEST.METRIC {get(cfg, 'TEST.METRIC')} is not supported: FastRetri ranks by cosine similarity "
            "(fast-reid's RetriEvaluator ignores TEST.METRIC too)"
        )


def resolve_config(args: argparse.Namespace, notes: bool = True) -> Dict:
    """YAML (+ _BASE_) -> ``opts`` overrides -> the shared flags that were given (--batch_size, --data_name ...);
    DATALOADER.NUM_WORKERS from a file or the defaults is capped at the cores available (a note says so when
    ``notes``), a number given with --num_workers or as an override is kept."""
    resume = getattr(args, "resume", None)
    if resume not in (None, "auto") and not Path(resume).exists() and resume.split(".")[0] in DEFAULTS:
        # `--resume SOLVER.MAX_EPOCH 60`: the flag took a config key as its path (fast-reid #543)
        args.opts, args.resume = [resume, *args.opts], "auto"
    cfg = load_config(args.config_file, args.opts)
    for flag, key in _CLI_KEYS.items():
        if getattr(args, flag, None) is not None:
            set_value(cfg, key, getattr(args, flag), f"--{flag}")
    if args.data_name is not None:
        cfg["DATASETS"]["NAMES"] = [args.data_name]
    if args.image_size is not None:  # scale resize and crop with the crop size, like every method's --image_size
        ratio = args.image_size / cfg["INPUT"]["CROP"]["SIZE"][0]
        for key in ("SIZE_TRAIN", "SIZE_TEST"):
            cfg["INPUT"][key] = [round(s * ratio) for s in cfg["INPUT"][key]]
        cfg["INPUT"]["CROP"]["SIZE"] = [args.image_size]
    if args.pretrained is not None:
        none = args.pretrained == "none"
        cfg["MODEL"]["BACKBONE"]["PRETRAIN"] = not none
        cfg["MODEL"]["BACKBONE"]["PRETRAIN_PATH"] = "" if none or args.pretrained == "imagenet" else args.pretrained
    workers, cores = cfg["DATALOADER"]["NUM_WORKERS"], available_cores()
    chosen = getattr(args, "num_workers", None) is not None or "DATALOADER.NUM_WORKERS" in args.opts[0::2]
    if workers > cores and not chosen:
        cfg["DATALOADER"]["NUM_WORKERS"] = cores
        if notes:
            print(f"note: DATALOADER.NUM_WORKERS {workers} > the {cores} cores available; using {cores}")
    data_name(cfg)
    check_config(cfg)
    return cfg


def write_config(cfg: Dict, path: Path, script: str = "fastretri/train.py") -> Path:
    """The resolved config as a complete YAML file (no ``_BASE_``): ``--config-file <path>`` repeats the run."""
    head = f"# resolved config; repeat the run with: python {script} --config-file {path}\n"
    text = head + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
    atomic_write(path, lambda f: f.write(text.encode()))
    return Path(path)


# The released config file of each benchmark (fastretri/configs/<file>.yml)
RELEASED_CONFIGS = {"cub": "cub", "car": "cars", "sop": "sop", "isc": "inshop"}


def released_config(name: str) -> Path:
    """The released config file of dataset ``name``; any other dataset (the demo, own data) takes CUB's."""
    return Path(__file__).parent / "configs" / f"{RELEASED_CONFIGS.get(name, 'cub')}.yml"


def data_name(cfg: Dict) -> str:
    """The processed dataset of ``DATASETS.NAMES``: fast-reid's names (CUB, Cars196, SOP, InShop), this toolkit's,
    or the name of a custom dataset made by data_utils.py (checked when its index is read)."""
    names = cfg["DATASETS"]["NAMES"]
    if len(names) != 1:
        raise UserError(
            f"DATASETS.NAMES must name one dataset (CUB, Cars196, SOP, InShop, demo or your own), got {names}"
        )
    return benchmark_name(str(names[0])) or str(names[0])  # fast-reid's names, e.g. Cars196, InShop


def pretrained_source(cfg: Dict) -> str:
    b = cfg["MODEL"]["BACKBONE"]
    return (b["PRETRAIN_PATH"] or "imagenet") if b["PRETRAIN"] else "none"


def config_dict(cfg: Dict) -> Dict:
    return plain_config(flatten(cfg))


def run_files(cfg: Dict) -> RunFiles:
    name = cfg["OUTPUT_NAME"] or run_name(
        data_name(cfg), cfg["DATASETS"]["CROP_TYPE"], cfg["MODEL"]["BACKBONE"]["NAME"]
    )
    return RunFiles(results_dir("fastretri"), name)


def unflatten(flat: Dict[str, Any]) -> Dict[str, Any]:
    """A full config from the dotted-key form stored in a model or database file."""
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in flat.items():
        set_value(cfg, key, value, "stored configuration")
    return cfg


# ---- the configuration beside a fast-reid model file (fast-reid writes OUTPUT_DIR/config.yaml) ----

# fast-reid keys that change the model or its evaluation and that this toolkit has no key for: their value must
# be the one FastRetri's model has
_FASTREID_FIXED = {
    "MODEL.META_ARCHITECTURE": "Baseline",
    "MODEL.BACKBONE.WITH_IBN": False,
    "MODEL.BACKBONE.WITH_SE": False,
    "MODEL.BACKBONE.WITH_NL": False,
    "MODEL.HEADS.NAME": "EmbeddingHead",
    "MODEL.HEADS.EMBEDDING_DIM": 0,
    "TEST.FLIP.ENABLED": False,  # test.py's --flip applies fast-reid's flip test
}
_FASTREID_PIXELS = {"MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53], "MODEL.PIXEL_STD": [58.395, 57.12, 57.375]}
_RESNET_DEPTHS = {"18x": "resnet18", "34x": "resnet34", "50x": "resnet50", "101x": "resnet101", "152x": "resnet152"}


def fastreid_run_config(path: Path) -> Dict[str, Any]:
    """The FastRetri config of a fast-reid run from the YAML beside its model: fast-reid's own dump
    (``config.yaml``, every fast-reid key) or a config of this toolkit.

    Keys this toolkit has are read as they are (``DATASETS.TESTS``, the evaluated dataset, becomes
    ``DATASETS.NAMES``); fast-reid's ``BACKBONE.NAME build_resnet_backbone`` + ``DEPTH 50x`` becomes ``resnet50``;
    fast-reid keys that would change the model or its evaluation without a key here must keep FastRetri's values
    (refused in one line otherwise); the rest (training-only settings) do not change an evaluation."""
    merged: Dict[str, Any] = {}
    for _, data in _read_yaml(Path(path)):
        merged.update(flatten(data))
    cfg = copy.deepcopy(DEFAULTS)
    ours = flatten(DEFAULTS)
    where = f"in {path}"
    name = merged.pop("MODEL.BACKBONE.NAME", "build_resnet_backbone")
    depth = merged.pop("MODEL.BACKBONE.DEPTH", "50x")
    if name == "build_resnet_backbone":
        if depth not in _RESNET_DEPTHS:
            raise UserError(f"MODEL.BACKBONE.DEPTH {depth} ({where}) is not a ResNet depth this toolkit builds")
        name = _RESNET_DEPTHS[depth]
    set_value(cfg, "MODEL.BACKBONE.NAME", name, where)
    tests = merged.pop("DATASETS.TESTS", None)
    if tests is not None:
        merged["DATASETS.NAMES"] = tests
    for key, expected in {**_FASTREID_FIXED, **_FASTREID_PIXELS}.items():
        if key in merged:
            value = merged.pop(key)
            same = value == expected if key not in _FASTREID_PIXELS else _close(value, expected)
            if not same:
                raise UserError(f"{key} {value} ({where}) is not supported: a FastRetri model has {expected}")
    for key, value in merged.items():
        if key in ours:
            set_value(cfg, key, value, where)
    data_name(cfg)
    check_config(cfg)
    return cfg


def _close(value: Any, expected: Sequence[float]) -> bool:
    values = list(value) if isinstance(value, (list, tuple)) else []
    return len(values) == len(expected) and all(abs(float(a) - b) < 1e-3 for a, b in zip(values, expected))
