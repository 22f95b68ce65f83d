"""No config key is accepted and ignored: every key of ``fastretri.config.DEFAULTS`` either changes what training
computes (transforms, model, loss, optimizer step, clipping, schedule, sampler, data, evaluation and checkpoint
epochs, AMP) or its value is refused at start with one ``error:`` line.

Each case changes one key from a base configuration (the tiny test config plus the case's own base overrides,
e.g. ``TRI.MARGIN`` is observed with ``TripletLoss`` in ``LOSSES.NAME``) and compares what the training code
builds from the two configurations.
"""

import copy
import math

import pandas as pd
import pytest
import torch
from PIL import Image

from common import engine
from common.errors import UserError
from fastretri import train
from fastretri.config import DEFAULTS, check_config, flatten, load_config, merge_opts, run_files
from fastretri.data import build_datasets, build_train_sampler, build_transforms
from fastretri.losses import FastRetriLoss
from fastretri.solver import build_optimizer, clipper_from_config, schedule_from_config, set_lr
from tests.tiny import make_tiny_processed

REFUSED = "refused"
CLIP = ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.01"]  # small enough that clipping acts on the tiny model
MULTISTEP = ["SOLVER.SCHED", "MultiStepLR"]
CJ_ALWAYS = ["INPUT.CJ.PROB", "1.0"]

# (key, value, what it changes or REFUSED, base overrides)
CASES = [
    ("MODEL.WEIGHTS", "model_final.pth", REFUSED, []),  # --eval-only reads it (test_scripts)
    ("MODEL.BACKBONE.NAME", "resnet34", "model", []),
    ("MODEL.BACKBONE.NAME", "vit", REFUSED, []),
    ("MODEL.BACKBONE.LAST_STRIDE", 2, "model", []),
    ("MODEL.BACKBONE.NORM", "BN", "model", []),
    ("MODEL.BACKBONE.NORM", "syncBN", "model", []),
    ("MODEL.BACKBONE.NORM", "GhostBN", REFUSED, []),
    ("MODEL.BACKBONE.NORM", "GN", REFUSED, []),
    ("MODEL.BACKBONE.PRETRAIN", True, "model", ["MODEL.BACKBONE.PRETRAIN_PATH", "{weights_a}"]),
    (
        "MODEL.BACKBONE.PRETRAIN_PATH",
        "{weights_b}",
        "model",
        ["MODEL.BACKBONE.PRETRAIN", "True", "MODEL.BACKBONE.PRETRAIN_PATH", "{weights_a}"],
    ),
    ("MODEL.HEADS.POOL_LAYER", "GeneralizedMeanPoolingP", "model", []),
    ("MODEL.HEADS.POOL_LAYER", "GlobalAvgPool", "model", []),
    ("MODEL.HEADS.POOL_LAYER", "FastGlobalAvgPool", "model", []),
    ("MODEL.HEADS.POOL_LAYER", "GlobalMaxPool", "model", []),
    ("MODEL.HEADS.POOL_LAYER", "AdaptiveAvgMaxPool", "model", []),
    ("MODEL.HEADS.POOL_LAYER", "ClipGlobalAvgPool", "model", []),
    ("MODEL.HEADS.POOL_LAYER", "Identity", REFUSED, []),
    ("MODEL.HEADS.POOL_LAYER", "Flatten", REFUSED, []),
    ("MODEL.HEADS.GEM_P", 1.0, "model", []),
    ("MODEL.HEADS.WITH_BNNECK", False, "model", []),
    ("MODEL.HEADS.NECK_FEAT", "before", "model", ["MODEL.LOSSES.NAME", "[CrossEntropyLoss, TripletLoss]"]),
    ("MODEL.HEADS.NECK_FEAT", "middle", REFUSED, []),
    ("MODEL.HEADS.CLS_LAYER", "CosSoftmax", "model", []),
    ("MODEL.HEADS.CLS_LAYER", "ArcSoftmax", "model", []),
    ("MODEL.HEADS.CLS_LAYER", "CircleSoftmax", "model", []),
    ("MODEL.HEADS.CLS_LAYER", "AMSoftmax", REFUSED, []),
    ("MODEL.HEADS.SCALE", 16.0, "model", []),
    ("MODEL.HEADS.MARGIN", 0.3, "model", ["MODEL.HEADS.CLS_LAYER", "CosSoftmax", "MODEL.HEADS.SCALE", "16"]),
    ("MODEL.LOSSES.NAME", ["CrossEntropyLoss", "TripletLoss"], "model", []),
    ("MODEL.LOSSES.NAME", ["TripletLoss"], "model", []),
    ("MODEL.LOSSES.NAME", ["CircleLoss"], "model", []),
    ("MODEL.LOSSES.NAME", ["Cosface"], "model", []),
    ("MODEL.LOSSES.NAME", ["FocalLoss"], REFUSED, []),
    ("MODEL.LOSSES.NAME", [], REFUSED, []),
    ("MODEL.LOSSES.CE.EPSILON", 0.0, "model", []),
    ("MODEL.LOSSES.CE.EPSILON", -1.0, "model", []),
    ("MODEL.LOSSES.CE.EPSILON", 1.0, REFUSED, []),
    ("MODEL.LOSSES.CE.ALPHA", 0.5, "model", ["MODEL.LOSSES.CE.EPSILON", "-1"]),
    ("MODEL.LOSSES.CE.SCALE", 2.0, "model", []),
    ("MODEL.LOSSES.TRI.MARGIN", 0.0, "model", ["MODEL.LOSSES.NAME", "[TripletLoss]"]),
    ("MODEL.LOSSES.TRI.NORM_FEAT", True, "model", ["MODEL.LOSSES.NAME", "[TripletLoss]"]),
    ("MODEL.LOSSES.TRI.HARD_MINING", True, "model", ["MODEL.LOSSES.NAME", "[TripletLoss]"]),
    ("MODEL.LOSSES.TRI.SCALE", 2.0, "model", ["MODEL.LOSSES.NAME", "[TripletLoss]"]),
    ("MODEL.LOSSES.CIRCLE.MARGIN", 0.4, "model", ["MODEL.LOSSES.NAME", "[CircleLoss]"]),
    ("MODEL.LOSSES.CIRCLE.GAMMA", 64.0, "model", ["MODEL.LOSSES.NAME", "[CircleLoss]"]),
    ("MODEL.LOSSES.CIRCLE.SCALE", 2.0, "model", ["MODEL.LOSSES.NAME", "[CircleLoss]"]),
    ("MODEL.LOSSES.COSFACE.MARGIN", 0.4, "model", ["MODEL.LOSSES.NAME", "[Cosface]"]),
    ("MODEL.LOSSES.COSFACE.GAMMA", 64.0, "model", ["MODEL.LOSSES.NAME", "[Cosface]"]),
    ("MODEL.LOSSES.COSFACE.SCALE", 2.0, "model", ["MODEL.LOSSES.NAME", "[Cosface]"]),
    ("INPUT.SIZE_TRAIN", [40], "transform", []),
    ("INPUT.SIZE_TEST", [36, 36], "transform", []),
    ("INPUT.CROP.ENABLED", False, "transform", []),
    ("INPUT.CROP.SIZE", [28], "transform", []),
    ("INPUT.CROP.SIZE", [32, 24], "transform", []),
    ("INPUT.CROP.SCALE", [0.5, 1.0], "transform", []),
    ("INPUT.CROP.RATIO", [1.0, 1.0], "transform", []),
    ("INPUT.FLIP.ENABLED", False, "transform", ["INPUT.FLIP.PROB", "1.0"]),
    ("INPUT.FLIP.PROB", 1.0, "transform", ["INPUT.FLIP.PROB", "0.0"]),
    ("INPUT.CJ.ENABLED", False, "transform", CJ_ALWAYS),
    ("INPUT.CJ.PROB", 1.0, "transform", ["INPUT.CJ.PROB", "0.0"]),
    ("INPUT.CJ.BRIGHTNESS", 0.6, "transform", CJ_ALWAYS),
    ("INPUT.CJ.CONTRAST", 0.6, "transform", CJ_ALWAYS),
    ("INPUT.CJ.SATURATION", 0.6, "transform", CJ_ALWAYS),
    ("INPUT.CJ.HUE", 0.2, "transform", CJ_ALWAYS),
    ("DATASETS.NAMES", ["InShop"], "data", []),
    ("DATASETS.NAMES", ["nope"], REFUSED, []),
    ("DATASETS.ROOT", "{other_root}", "data", []),
    ("DATASETS.CROP_TYPE", "cropped", "data", []),
    ("DATALOADER.SAMPLER_TRAIN", "NaiveIdentitySampler", "sampler", []),
    ("DATALOADER.SAMPLER_TRAIN", "BalancedIdentitySampler", "sampler", []),
    ("DATALOADER.SAMPLER_TRAIN", "SetReWeightSampler", REFUSED, []),
    ("DATALOADER.SAMPLER_TRAIN", "ImbalancedDatasetSampler", REFUSED, []),
    ("DATALOADER.NUM_INSTANCE", 2, "sampler", ["DATALOADER.SAMPLER_TRAIN", "NaiveIdentitySampler"]),
    ("DATALOADER.NUM_INSTANCE", 3, REFUSED, ["DATALOADER.SAMPLER_TRAIN", "NaiveIdentitySampler"]),
    ("DATALOADER.NUM_INSTANCE", 1, REFUSED, ["DATALOADER.SAMPLER_TRAIN", "BalancedIdentitySampler"]),  # 8 ids
    ("SOLVER.AMP.ENABLED", False, "loop", []),
    ("SOLVER.AMP.DTYPE", "float16", "loop", []),
    ("SOLVER.AMP.DTYPE", "float32", REFUSED, []),
    ("SOLVER.COMPILE", True, "loop", []),
    ("SOLVER.OPT", "Adam", "model", []),
    ("SOLVER.OPT", "LBFGS", REFUSED, []),
    ("SOLVER.OPT", "Lamb", REFUSED, []),
    ("SOLVER.MAX_EPOCH", 3, "schedule", []),
    ("SOLVER.BASE_LR", 0.5, "model", []),
    ("SOLVER.BASE_LR", 0.5, "schedule", []),
    ("SOLVER.MOMENTUM", 0.9, "model", []),
    ("SOLVER.NESTEROV", True, "model", ["SOLVER.MOMENTUM", "0.9"]),
    ("SOLVER.WEIGHT_DECAY", 0.5, "model", []),
    ("SOLVER.WEIGHT_DECAY_BIAS", 0.5, "model", ["MODEL.BACKBONE.NORM", "BN"]),
    ("SOLVER.WEIGHT_DECAY_NORM", 0.5, "model", []),
    ("SOLVER.BIAS_LR_FACTOR", 2.0, "model", ["MODEL.BACKBONE.NORM", "BN"]),
    ("SOLVER.SCHED", "MultiStepLR", "schedule", []),
    ("SOLVER.SCHED", "StepLR", REFUSED, []),
    ("SOLVER.DELAY_EPOCHS", 2, "schedule", ["SOLVER.MAX_EPOCH", "5"]),
    ("SOLVER.STEPS", [1], "schedule", MULTISTEP),
    ("SOLVER.STEPS", [0, 1], REFUSED, MULTISTEP),
    ("SOLVER.GAMMA", 0.5, "schedule", [*MULTISTEP, "SOLVER.STEPS", "[1]"]),
    ("SOLVER.ETA_MIN_LR", 0.001, "schedule", []),
    ("SOLVER.WARMUP_FACTOR", 0.5, "schedule", []),
    ("SOLVER.WARMUP_ITERS", 0, "schedule", []),
    ("SOLVER.WARMUP_METHOD", "constant", "schedule", []),
    ("SOLVER.WARMUP_METHOD", "exp", "schedule", []),
    ("SOLVER.WARMUP_METHOD", "cosine", REFUSED, []),
    ("SOLVER.CLIP_GRADIENTS.ENABLED", False, "model", CLIP),
    ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value", "model", CLIP),
    ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "l2", REFUSED, []),
    ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.02, "model", CLIP),
    ("SOLVER.CLIP_GRADIENTS.NORM_TYPE", 1.0, "model", CLIP),
    ("SOLVER.CLIP_GRADIENTS.NORM_TYPE", 0.0, REFUSED, []),
    ("SOLVER.IMS_PER_BATCH", 4, "sampler", []),
    ("SOLVER.IMS_PER_BATCH", 100, REFUSED, []),  # more than the 24 training images
    ("SOLVER.CHECKPOINT_PERIOD", 1, "loop", []),
    ("TEST.EVAL_PERIOD", 2, "loop", []),
    ("TEST.METRIC", "euclidean", REFUSED, []),
    ("SEED", 1, "sampler", []),
    ("OUTPUT_NAME", "other", "data", []),
]
# keys whose effect is on the training run itself (the evaluation loader and the recall columns): test below
RUN_KEYS = {"DATALOADER.NUM_WORKERS", "TEST.IMS_PER_BATCH", "TEST.RECALLS"}


@pytest.fixture(scope="module")
def context(tiny_data, tiny_config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    for name, seed in (("weights_a", 1), ("weights_b", 2)):
        torch.manual_seed(seed)
        torch.save(__import__("torchvision").models.resnet18().state_dict(), folder / f"{name}.pth")
    other = make_tiny_processed(folder / "other_root", "cub", num_classes=8, per_class=6, size=32)
    torch.manual_seed(0)
    return {
        "config": tiny_config,
        "data": tiny_data,
        "paths": {"weights_a": folder / "weights_a.pth", "weights_b": folder / "weights_b.pth", "other_root": other},
        "image": Image.fromarray((torch.rand(48, 40, 3) * 255).byte().numpy()),
        "x": torch.randn(8, 3, 32, 32),
        "y": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
    }


def _config(ctx, base, key=None, value=None):
    cfg = load_config(ctx["config"], ["DATASETS.ROOT", str(ctx["data"])])
    merge_opts(cfg, [str(v).format(**ctx["paths"]) for v in base])
    if key is not None:
        value = str(value).format(**ctx["paths"]) if isinstance(value, str) else value
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = copy.deepcopy(value)
    return cfg


def _observe(cfg, what, ctx):
    """What the training code builds from ``cfg`` that ``what`` names."""
    if what == "transform":
        torch.manual_seed(0)
        train_tf, test_tf = build_transforms(cfg)
        return [train_tf(ctx["image"]) for _ in range(4)] + [test_tf(ctx["image"])]
    if what == "model":  # two training steps as train_one_epoch takes them
        torch.manual_seed(0)
        model = train.training_model(cfg, 4)
        embedding = model.eval()(ctx["x"][:2])
        model.train()
        optimizer, criterion, clip = build_optimizer(model, cfg), FastRetriLoss(cfg), clipper_from_config(cfg)
        set_lr(optimizer, cfg["SOLVER"]["BASE_LR"])
        losses = []
        for _ in range(2):
            loss, parts = criterion(model(ctx["x"]), ctx["y"])
            optimizer.zero_grad()
            loss.backward()
            if clip is not None:
                clip(optimizer)
            optimizer.step()
            losses.append({k: v.item() for k, v in parts.items()})
        return [repr(model), type(optimizer).__name__, embedding, losses, model.state_dict()]
    if what == "sampler":
        sampler = build_train_sampler(cfg, build_datasets(cfg)["train"].labels)
        batches = []
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            batches += list(sampler)
        return batches
    if what == "schedule":
        ipe = len(build_datasets(cfg)["train"]) // cfg["SOLVER"]["IMS_PER_BATCH"]
        schedule = schedule_from_config(cfg, ipe)
        return [schedule(i) for i in range(ipe * cfg["SOLVER"]["MAX_EPOCH"])]
    if what == "data":
        return [run_files(cfg).name] + [(n, d.images, d.labels) for n, d in build_datasets(cfg).items()]
    if what == "loop":
        epochs = range(cfg["SOLVER"]["MAX_EPOCH"] + 1)
        precision = train.precision_from_config(cfg, torch.device("cpu"), main=False)
        return [
            (precision.dtype, precision.scaler is not None, precision.channels_last),  # CPU autocast as on CUDA
            train.compiles(cfg),
            [train.evaluates(cfg, e) for e in epochs],
            [train.snapshots(cfg, e) for e in epochs],
        ]
    raise ValueError(what)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_every_key_is_covered():
    keys = set(flatten(DEFAULTS))
    covered = {case[0] for case in CASES} | RUN_KEYS
    assert keys == covered, f"not covered: {sorted(keys - covered)}; unknown: {sorted(covered - keys)}"
    effects = {case[0] for case in CASES if case[2] != REFUSED} | RUN_KEYS
    assert keys - effects == {"MODEL.WEIGHTS", "TEST.METRIC"}  # the two keys with one supported value in training


@pytest.mark.parametrize("key, value, what, base", [c for c in CASES if c[2] != REFUSED], ids=lambda v: str(v))
def test_key_changes_what_training_builds(context, key, value, what, base):
    before = _config(context, base)
    after = _config(context, base, key, value)
    assert after != before
    check_config(after)
    assert not _same(_observe(before, what, context), _observe(after, what, context))


@pytest.mark.parametrize("key, value, what, base", [c for c in CASES if c[2] == REFUSED], ids=lambda v: str(v))
def test_key_value_is_refused_at_start(context, key, value, what, base):
    cfg = _config(context, base, key, value)
    with pytest.raises(UserError) as e:
        check_config(cfg)
        train.check_setup(cfg, 1)
    assert "\n" not in str(e.value)


def test_run_keys_act_on_the_run(context, results, monkeypatch):
    """DATALOADER.NUM_WORKERS (training loader), TEST.IMS_PER_BATCH (evaluation batches), TEST.RECALLS (the
    statistics' columns); TEST.EVAL_PERIOD and SOLVER.CHECKPOINT_PERIOD seen in the files of the same runs."""
    loaders, embeds = [], []
    real_loader, real_embed = train.DataLoader, engine.embed_dataset

    def loader(*args, **kwargs):
        loaders.append(kwargs["num_workers"])
        return real_loader(*args, **kwargs)

    def embed(*args, **kwargs):
        embeds.append(kwargs["batch_size"])
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(train, "DataLoader", loader)
    monkeypatch.setattr(engine, "embed_dataset", embed)  # what evaluate calls
    runs = {}
    for name, opts in {
        "base": [],
        "changed": ["DATALOADER.NUM_WORKERS", "1", "TEST.IMS_PER_BATCH", "5", "TEST.RECALLS", "[1, 2]"]
        + ["TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "1"],
    }.items():
        loaders.clear()
        embeds.clear()
        argv = ["--config-file", str(context["config"]), "--data_path", str(context["data"]), "--num-gpus", "0"]
        train.main(train.get_args_parser().parse_args(argv + ["OUTPUT_NAME", name, *opts]))
        stats = pd.read_csv(results / f"{name}_statistics.csv", index_col="epoch")
        files = sorted(p.name[len(name) + 1 :] for p in results.glob(f"{name}_*"))
        runs[name] = (
            list(loaders),
            sorted(set(embeds)),
            list(stats.columns),
            stats["test_recall@1"].isna().tolist(),
            files,
        )
    base, changed = runs["base"], runs["changed"]
    assert base[0] == [0] and changed[0] == [1]
    assert base[1] == [16] and changed[1] == [5]
    assert "test_recall@4" in base[2] and "test_recall@4" not in changed[2] and "test_recall@2" in changed[2]
    assert base[3] == [False, False, False] and changed[3] == [False, True, False]  # epoch 1 not evaluated
    assert "model_0001.pth" not in base[4] and "model_0001.pth" in changed[4]
