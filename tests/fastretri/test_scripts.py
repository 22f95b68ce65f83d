"""End to end on tiny data: train (+ resume) -> test -> inference -> ablation, all in-process."""

import pandas as pd
import pytest
import torch
from PIL import Image

from common.errors import UserError
from fastretri import ablation, inference, test, train
from fastretri.config import load_config, resolve_config

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
