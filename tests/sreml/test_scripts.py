"""SREML end to end on tiny data: REIR's engine in SREML's setting, SREML's names, defaults and contract files."""

import pandas as pd
import pytest
import torch

from common.database import Split, load_database, save_database
from reir.model import Model
from sreml import ablation, inference, train
from sreml import test as sreml_test
from tests.tiny import make_tiny_processed, tiny_args

RUN = "isc_uncropped_resnet18"


def test_sreml_defaults():
    args = train.get_args_parser().parse_args([])
    assert (args.batch_size, args.num_epochs, args.ensemble_size, args.meta_class_size) == (12, 20, 48, 12)
    assert args.recalls == [1, 2, 4, 8, 10, 20, 30, 40, 50, 100, 1000]
    assert (args.share_type, args.label_type, args.with_random, args.method) == ("layer1", "random", False, "sreml")
    assert args.model_selection == "best" and args.float64 is False and args.augment is True
    assert (args.amp, args.amp_dtype, args.compile) == (False, "bfloat16", False)  # reir.recipe's, tested there
    with pytest.raises(SystemExit):  # REIR-only flags do not exist here
        train.get_args_parser().parse_args(["--share_type", "layer2"])
    assert sreml_test.get_args_parser().parse_args([]).data_base == "car_uncropped_resnet18_data_base.pth"
    better = ablation.get_args_parser().parse_args([])
    assert (better.better_data_base, better.worse_data_base) == (
        "car_uncropped_resnet34_data_base.pth",
        "car_uncropped_resnet18_data_base.pth",
    )


def test_sreml_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    data = make_tiny_processed(tmp_path / "data", "isc", num_classes=6, per_class=4, size=36)
    common = ["--data_path", str(data), "--num_workers", "0", "--gpu_ids", ""]
    options = "--image_size 32 --batch_size 6 --ensemble_size 4 --meta_class_size 2 --num_epochs 1 --recalls 1,2,4"
    train.main(train.get_args_parser().parse_args(tiny_args(data, "isc", f"{options} --gpu_ids ''")))
    out = tmp_path / "results" / "sreml"
    for suffix in ("model.pth", "data_base.pth", "checkpoint.pth", "statistics.csv"):
        assert (out / f"{RUN}_{suffix}").is_file(), suffix
    assert (out / "isc_uncropped_random_4_2_ids.pth").is_file()
    assert not (tmp_path / "results" / "reir").exists()
    state = torch.load(out / f"{RUN}_model.pth", weights_only=True)
    assert len([k for k in state["model"] if k.startswith("common_extractor.")]) > 0
    assert state["config"]["share_type"] == "layer1" and state["config"]["with_random"] is False
    assert state["config"]["method"] == "sreml"
    db = load_database(out / f"{RUN}_data_base.pth")
    assert (db.method, db.query, db.gallery, db.scale) == ("sreml", "query", "gallery", 4.0)
    assert db.split("query").features.shape[1] == 8

    name = f"{RUN}_data_base.pth"
    training_db = (out / name).read_bytes()
    metrics = sreml_test.main(
        sreml_test.get_args_parser().parse_args(["--data_base", name, "--recalls", "1,2", *common])
    )
    assert (out / name).read_bytes() == training_db
    assert pd.read_csv(out / f"{RUN}_test_metrics.csv")["test_recall@1"].item() == pytest.approx(
        metrics["test_recall@1"]
    )
    stats = pd.read_csv(out / f"{RUN}_statistics.csv", index_col="epoch")
    assert metrics["test_recall@1"] == pytest.approx(stats.loc[1, "test_recall@1"])
    # query and gallery are different splits: the gallery item with the query's index is NOT dropped
    query = db.split("query").images[0]
    [(folder, results)] = inference.main(
        inference.get_args_parser().parse_args(
            ["--query_img_name", query, "--data_base", name, "--retrieval_num", "4", "--gpu_ids", ""]
        )
    )
    brute = db.split("gallery").features @ db.split("query").features[0] / 4
    torch.testing.assert_close(torch.tensor([s for _, _, s in results]), brute.topk(4).values, rtol=0, atol=1e-5)
    assert folder == out / query.rsplit("/", 1)[1].rsplit(".", 1)[0]
    assert (folder / "grid.png").is_file() and (folder / "ranking.csv").is_file()
    # a 'worse' database: the same images and labels, the gallery's feature rows shuffled
    gallery = db.split("gallery")
    shuffled = gallery.features[torch.randperm(len(gallery.images), generator=torch.Generator().manual_seed(0))]
    worse_splits = {**db.splits, "gallery": Split(gallery.images, gallery.labels, shuffled)}
    save_database(out / "worse_data_base.pth", config=db.config, method=db.method, splits=worse_splits,
                  metric=db.metric, scale=db.scale, query=db.query, gallery=db.gallery)  # fmt: skip
    result = ablation.main(
        ablation.get_args_parser().parse_args(
            ["--better_data_base", name, "--worse_data_base", "worse_data_base.pth", "--retrieval_num", "2"]
        )
    )

    def correct_in_top2(features: torch.Tensor) -> list:  # brute force: stable sort of cosine / E, best first
        labels = torch.tensor(gallery.labels)
        return [
            int((labels[torch.sort(-(features @ q), stable=True).indices[:2]] == y).sum())
            for q, y in zip(db.split("query").features, db.split("query").labels)
        ]

    better, worse = correct_in_top2(gallery.features), correct_in_top2(shuffled)
    wins = sum(b > w for b, w in zip(better, worse))
    ties = sum(b == w for b, w in zip(better, worse))
    assert (result["wins"], result["ties"], result["losses"]) == (wins, ties, len(better) - wins - ties)
    assert wins + (len(better) - wins - ties) > 0  # the shuffle changed some query's top 2


def test_sreml_model_is_reir_model_with_layer1():
    with torch.device("meta"):
        model = Model("resnet18", "layer1", 48, 12)
    assert sum(p.numel() for p in model.parameters()) == 529_365_376
