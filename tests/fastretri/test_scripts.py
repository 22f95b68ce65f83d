"""End to end on tiny data: train (+ resume) -> test -> inference -> ablation, all in-process."""

import pandas as pd
import pytest
import torch
from PIL import Image

from common.errors import UserError
from fastretri import ablation, export, inference, test, train
from fastretri.config import load_config, resolve_config
from tests.training import assert_events_match_csv, assert_float32_database, record_speed

NAME = "cub_uncropped_resnet18"


def _train(config, data, *extra):
    train.main(
        train.get_args_parser().parse_args(
            ["--config-file", str(config), "--data_path", str(data), "--num-gpus", "0", *extra]
        )
    )


def test_train_test_inference_ablation(tiny_config, tiny_data, results, tmp_path):
    _train(tiny_config, tiny_data, "SOLVER.MAX_EPOCH", "1")
    for suffix in ("statistics.csv", "statistics.png", "checkpoint.pth", "model.pth", "data_base.pth"):
        assert (results / f"{NAME}_{suffix}").is_file(), suffix
    _train(tiny_config, tiny_data, "--resume", "SOLVER.MAX_EPOCH", "2")  # continue the same run to epoch 2
    resumed = ["--config-file", str(tiny_config), "--data_path", str(tiny_data), "--num-gpus", "0", "--resume"]
    cfg = resolve_config(train.get_args_parser().parse_args([*resumed, "SOLVER.MAX_EPOCH", "2"]))
    assert load_config(results / f"{NAME}_config.yaml") == cfg and cfg["SOLVER"]["MAX_EPOCH"] == 2
    stats = pd.read_csv(results / f"{NAME}_statistics.csv", index_col="epoch")
    assert list(stats.index) == [0, 1, 2] and {"train_loss", "lr", "test_recall@1"} <= set(stats.columns)
    assert torch.load(results / f"{NAME}_checkpoint.pth", weights_only=True)["epoch"] == 2
    db = torch.load(results / f"{NAME}_data_base.pth", weights_only=True)
    feats = db["splits"]["test"]["features"]
    assert db["metric"] == "cosine" and torch.allclose(feats.norm(dim=1), torch.ones(len(feats)), atol=1e-5)

    training_db = (results / f"{NAME}_data_base.pth").read_bytes()
    metrics = test.main(
        test.get_args_parser().parse_args(
            [
                "--data_base",
                f"{NAME}_data_base.pth",
                "--data_path",
                str(tiny_data),
                "--recalls",
                "1,2,4",
                "--num_workers",
                "0",
            ]
        )
    )
    assert set(metrics) == {"test_recall@1", "test_recall@2", "test_recall@4", "test_map@r", "test_r_precision"}
    assert metrics["test_recall@1"] == pytest.approx(stats.loc[2, "test_recall@1"], abs=1e-6)  # the last epoch
    assert (results / f"{NAME}_test_metrics.csv").is_file()
    assert (results / f"{NAME}_data_base.pth").read_bytes() == training_db
    # fast-reid's spelling: train_net.py --eval-only on the run's model file
    again = train.main(
        train.get_args_parser().parse_args(
            ["--config-file", str(tiny_config), "--data_path", str(tiny_data), "--num-gpus", "0", "--eval-only"]
        )
    )
    assert again == pytest.approx(metrics)

    query = db["splits"]["test"]["images"][0]

    def infer(name):
        args = ["--query_img_name", name, "--data_base", f"{NAME}_data_base.pth", "--retrieval_num", "3"]
        return inference.main(inference.get_args_parser().parse_args(args))[0][1]

    found = infer(query)
    assert len(found) == 3 and query not in [p for p, _, _ in found]
    assert (results / "img_5_0" / "grid.png").is_file() and (results / "img_5_0" / "ranking.csv").is_file()
    new = tmp_path / "new_query.png"
    Image.open(query).save(new)  # a file outside the database is embedded with the model
    found_new = infer(str(new))
    assert found_new[0][0] == query and found_new[0][2] == pytest.approx(1.0, abs=1e-4)

    result = ablation.main(
        ablation.get_args_parser().parse_args(
            ["--better_data_base", f"{NAME}_data_base.pth", "--worse_data_base", f"{NAME}_data_base.pth"]
        )
    )
    assert result["ties"] == 24 and result["GE_Rate@8"] == 100.0


def test_eval_only_refuses_other_model(tiny_config, tiny_data, results):
    _train(tiny_config, tiny_data, "SOLVER.MAX_EPOCH", "0")  # epoch-0 evaluation only: the model file is written
    path = results / f"{NAME}_model.pth"
    assert path.is_file()
    with pytest.raises(UserError, match="MODEL.HEADS.GEM_P"):
        _train(tiny_config, tiny_data, "--eval-only", "MODEL.HEADS.GEM_P", "1", "MODEL.WEIGHTS", str(path))


def test_in_shop_query_gallery(tiny_config, tiny_data, results):
    _train(tiny_config, tiny_data, "--data_name", "isc", "SOLVER.MAX_EPOCH", "1")
    db = torch.load(results / "isc_uncropped_resnet18_data_base.pth", weights_only=True)
    assert (db["query"], db["gallery"]) == ("query", "gallery") and set(db["splits"]) == {"query", "gallery"}


# ---- evaluation in float32 under AMP ----


def test_evaluation_is_float32_inside_an_autocast_region(tiny_config, tiny_data):
    """Evaluation during AMP training computes what test.py computes: features in float32, even when called
    inside an active autocast region (CPU bfloat16 here; on CUDA the training step's)."""
    from common.data.datasets import eval_splits
    from common.engine import evaluate
    from fastretri.config import load_config
    from fastretri.data import build_datasets
    from fastretri.model import build_model
    from fastretri.spec import embed

    cfg = load_config(tiny_config, ["DATASETS.ROOT", str(tiny_data)])
    datasets = build_datasets(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, 4, "none")
    query, gallery = eval_splits("cub", str(tiny_data))
    args = (model, datasets, query, gallery, [1, 2, 4], torch.device("cpu"))
    kwargs = dict(embed=embed, batch_size=16, num_workers=0)
    plain = evaluate(*args, **kwargs).splits["test"].features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = evaluate(*args, **kwargs).splits["test"].features
        bf16 = torch.nn.functional.normalize(model.eval()(datasets["test"][0][0][None]).float(), dim=1)
    assert torch.equal(under_amp, plain)
    assert (bf16[0] - plain[0]).abs().max() > 1e-4  # the region does change a forward pass it reaches


def test_amp_and_compile_run_trains_in_bfloat16_and_saves_float32_features(
    tiny_config, tiny_data, results, monkeypatch, tmp_path
):
    """SOLVER.AMP on (CPU bfloat16 autocast, as on CUDA) and --compile (SOLVER.COMPILE): the model is compiled, the
    training forward ran in bfloat16, and the database it saves holds the features test.py recomputes in float32
    from its model; the TensorBoard events hold the CSV's rows and every iteration."""
    seen = record_speed(monkeypatch)
    dtypes, real = [], train.FastRetriLoss.forward

    def loss(self, out, targets):
        dtypes.append(out.logits.dtype)
        return real(self, out, targets)

    monkeypatch.setattr(train.FastRetriLoss, "forward", loss)
    _train(tiny_config, tiny_data, "--compile", "SOLVER.MAX_EPOCH", "1", "SOLVER.AMP.ENABLED", "True")
    assert seen["graphs"] and dtypes and set(dtypes) == {torch.bfloat16}
    model = torch.load(results / f"{NAME}_model.pth", weights_only=True)
    assert model["config"]["SOLVER.COMPILE"] is True
    assert_float32_database(test, results / f"{NAME}_model.pth", results / f"{NAME}_data_base.pth", tiny_data, tmp_path)
    steps = len(dtypes)  # one loss per iteration
    assert_events_match_csv(results / f"{NAME}_tensorboard", results / f"{NAME}_statistics.csv", steps)


# ---- fast-reid's model_final.pth through every script ----

# fast-reid's config.yaml (default_setup writes cfg.dump() into OUTPUT_DIR): FastRetri's CUB recipe on the tiny
# images, with a sample of the keys fast-reid has and this toolkit does not
FASTREID_DUMP = """\
CUDNN_BENCHMARK: true
DATALOADER: {{NUM_INSTANCE: 4, NUM_WORKERS: 8, SAMPLER_TRAIN: TrainingSampler, SET_WEIGHT: []}}
DATASETS: {{COMBINEALL: false, NAMES: [CUB], TESTS: [CUB]}}
INPUT:
  AFFINE: {{ENABLED: false}}
  AUTOAUG: {{ENABLED: false, PROB: 0.0}}
  CJ: {{BRIGHTNESS: 0.25, CONTRAST: 0.25, ENABLED: true, HUE: 0.0, PROB: 0.5, SATURATION: 0.25}}
  CROP: {{ENABLED: true, RATIO: [0.75, 1.33333], SCALE: [0.16, 1.0], SIZE: [32]}}
  FLIP: {{ENABLED: true, PROB: 0.5}}
  PADDING: {{ENABLED: false, MODE: constant, SIZE: 10}}
  REA: {{ENABLED: false, PROB: 0.5, VALUE: [123.675, 116.28, 103.53]}}
  SIZE_TEST: [32, 32]
  SIZE_TRAIN: [36]
KD: {{EMA: {{ENABLED: false, MOMENTUM: 0.999}}, MODEL_CONFIG: [], MODEL_WEIGHTS: []}}
MODEL:
  BACKBONE: {{ATT_DROP_RATE: 0.0, DEPTH: {depth}, FEAT_DIM: 512, LAST_STRIDE: 1, NAME: build_resnet_backbone,
    NORM: FrozenBN, PRETRAIN: true, PRETRAIN_PATH: '', WITH_IBN: false, WITH_NL: false, WITH_SE: false}}
  DEVICE: cuda
  FREEZE_LAYERS: []
  HEADS: {{CLS_LAYER: Linear, EMBEDDING_DIM: 0, MARGIN: 0.0, NAME: EmbeddingHead, NECK_FEAT: after, NORM: syncBN,
    NUM_CLASSES: 7, POOL_LAYER: GeneralizedMeanPooling, SCALE: 1, WITH_BNNECK: true}}
  LOSSES:
    CE: {{ALPHA: 0.2, EPSILON: 0.3, SCALE: 1.0}}
    NAME: [CrossEntropyLoss]
    TRI: {{HARD_MINING: false, MARGIN: 0.3, NORM_FEAT: false, SCALE: 1.0}}
  META_ARCHITECTURE: Baseline
  PIXEL_MEAN: [123.675, 116.28, 103.53]
  PIXEL_STD: [58.395, 57.120000000000005, 57.375]
  QUEUE_SIZE: 8192
  WEIGHTS: ''
OUTPUT_DIR: projects/FastRetri/logs/r50-base_cub
SOLVER: {{AMP: {{ENABLED: true}}, BASE_LR: 0.02, CHECKPOINT_PERIOD: 10, IMS_PER_BATCH: 128, MAX_EPOCH: 30,
  OPT: SGD, SCHED: CosineAnnealingLR, FREEZE_ITERS: 0, HEADS_LR_FACTOR: 1.0}}
TEST: {{AQE: {{ALPHA: 3.0, ENABLED: false, QE_K: 5, QE_TIME: 1}}, EVAL_PERIOD: 10, FLIP: {{ENABLED: {flip}}},
  IMS_PER_BATCH: 256, METRIC: cosine, RECALLS: [1, 2, 4], RERANK: {{ENABLED: false, K1: 20, K2: 6, LAMBDA: 0.3}}}}
"""


def _fastreid_run(folder, seed=0, depth="18x", flip="false"):
    """fast-reid's OUTPUT_DIR: model_final.pth (its Checkpointer's layout) and config.yaml."""
    from tests.fastretri.test_model import _trained_fastreid, _write_like_fastreid

    folder.mkdir(parents=True, exist_ok=True)
    _write_like_fastreid(_trained_fastreid(seed=seed), folder / "model_final.pth")
    (folder / "config.yaml").write_text(FASTREID_DUMP.format(depth=depth, flip=flip))
    return folder / "model_final.pth"


def test_fastreid_model_final_through_every_script(tiny_config, tiny_data, results, tmp_path):
    model_final = _fastreid_run(tmp_path / "r50-base_cub")
    common = ["--data_path", str(tiny_data), "--num_workers", "0", "--recalls", "1,2,4"]
    metrics = test.main(
        test.get_args_parser().parse_args(
            ["--model_file", str(model_final), *common, "--save_data_base", str(results / "fr_a.pth")]
        )
    )
    eval_only = train.main(
        train.get_args_parser().parse_args(
            ["--config-file", str(tiny_config), "--data_path", str(tiny_data), "--num-gpus", "0", "--eval-only"]
            + ["MODEL.WEIGHTS", str(model_final)]
        )
    )
    assert metrics == pytest.approx(eval_only)  # config.yaml describes the same model as the tiny YAML
    db = torch.load(results / "fr_a.pth", weights_only=True)
    assert db["config"]["num_classes"] == 7 and db["config"]["MODEL.BACKBONE.NAME"] == "resnet18"
    assert db["config"]["original_file"] == str(model_final.resolve())

    meta = export.main(
        export.get_args_parser().parse_args(
            ["--model_file", str(model_final), "--output", str(tmp_path / "export"), "--format", "torchscript"]
        )
    )
    assert meta["embedding_size"] == 512 and (tmp_path / "export" / "embedding.json").is_file()

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    images = db["splits"]["test"]["images"]
    for i, path in enumerate(images[:6]):
        Image.open(path).save(gallery / f"g{i}.png")
    new = tmp_path / "new_query.png"
    Image.open(images[0]).save(new)
    args = ["--gallery", str(gallery), "--save_data_base", str(results / "g.pth"), "--model_file", str(model_final)]
    args += ["--num_workers", "0", "--retrieval_num", "3", "--query_img_name", str(new)]
    found = inference.main(inference.get_args_parser().parse_args(args))[0][1]
    assert found[0][0].endswith("g0.png") and found[0][2] == pytest.approx(1.0, abs=1e-4)
    # a later query of the gallery database embeds with the fast-reid file it records
    again = ["--data_base", str(results / "g.pth"), "--query_img_name", str(new), "--retrieval_num", "3"]
    assert inference.main(inference.get_args_parser().parse_args(again))[0][1] == found[:3]

    other = _fastreid_run(tmp_path / "other", seed=1)
    test.main(
        test.get_args_parser().parse_args(
            ["--model_file", str(other), *common, "--save_data_base", str(results / "fr_b.pth")]
        )
    )
    result = ablation.main(
        ablation.get_args_parser().parse_args(
            ["--better_data_base", str(results / "fr_a.pth"), "--worse_data_base", str(results / "fr_b.pth")]
        )
    )
    assert 0 <= result["GE_Rate@8"] <= 100


def test_fastreid_model_final_needs_its_config(tmp_path):
    model_final = _fastreid_run(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(UserError, match="no fast-reid config.yaml beside it") as e:
        test.main(test.get_args_parser().parse_args(["--model_file", str(model_final)]))
    assert "\n" not in str(e.value)
    model_final = _fastreid_run(tmp_path / "flip", flip="true")
    with pytest.raises(UserError, match="TEST.FLIP.ENABLED True .* not supported"):
        test.main(test.get_args_parser().parse_args(["--model_file", str(model_final)]))
    model_final = _fastreid_run(tmp_path / "r50", depth="50x")  # a ResNet-18 file under a ResNet-50 config
    with pytest.raises(UserError, match="does not fit missing"):
        test.main(test.get_args_parser().parse_args(["--model_file", str(model_final)]))
