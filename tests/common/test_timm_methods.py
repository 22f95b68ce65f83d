"""Every method with a timm backbone, end to end on tiny data: one epoch of training, then test.py rebuilds the
model from the stored configuration alone and reproduces the training's Recall@1; run names are file names."""

import pandas as pd
import pytest
import torch

from common.errors import UserError
from tests.fastretri.conftest import TINY_YML
from tests.tiny import make_tiny_processed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_processed(tmp_path_factory.mktemp("data"), "cub", num_classes=6, per_class=4, size=36)


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def _retest(module, folder, run: str, data, recalls: str = "1,2") -> dict:
    """test.py on the run's database: re-embeds the test split with the model rebuilt from the stored config."""
    args = ["--data_base", f"{run}_data_base.pth", "--data_path", str(data), "--num_workers", "0"]
    return module.main(module.get_args_parser().parse_args([*args, "--recalls", recalls]))


def _check_run(folder, run: str, key: str, backbone: str, metrics: dict) -> None:
    assert sorted(p.name for p in folder.glob(f"{run}_*.pth")) == [
        f"{run}_{s}.pth" for s in ("checkpoint", "data_base", "model")
    ]
    assert ":" not in run and "/" not in run
    stored = torch.load(folder / f"{run}_model.pth", weights_only=True)["config"]
    assert stored[key] == backbone
    stats = pd.read_csv(folder / f"{run}_statistics.csv", index_col="epoch")
    assert list(stats.index) == [0, 1] and stats.loc[1, "train_loss"] == stats.loc[1, "train_loss"]  # not NaN
    assert metrics["test_recall@1"] == pytest.approx(stats["test_recall@1"].iloc[-1], abs=1e-6)


def test_cgd_with_a_vit(data, results):
    import cgd.test
    import cgd.train

    backbone = "timm:vit_tiny_patch16_224"
    flags = ["--data_path", str(data), "--data_name", "cub", "--backbone_type", backbone, "--pretrained", "none"]
    flags += ["--image_size", "32", "--batch_size", "8", "--num_epochs", "1", "--num_workers", "0"]
    flags += ["--feature_dim", "32", "--recalls", "1,2", "--no-freeze_bn", "--model_selection", "last"]
    cgd.train.main(cgd.train.get_args_parser().parse_args(flags))
    run = "cub_uncropped_timm-vit_tiny_patch16_224_SG_32_0.1_0.5_0.1_8"
    metrics = _retest(cgd.test, results / "cgd", run, data)
    _check_run(results / "cgd", run, "backbone_type", backbone, metrics)


TIMM_YML = (  # the FastRetri tests' tiny config with a timm backbone, one epoch, R@1 and R@2
    TINY_YML.replace("NAME: resnet18", "NAME: timm:convnext_atto")
    .replace("MAX_EPOCH: 2", "MAX_EPOCH: 1")
    .replace("RECALLS: [1, 2, 4]", "RECALLS: [1, 2]")
)


def test_fastretri_with_a_convnext(data, results, tmp_path):
    from pathlib import Path

    import fastretri.test
    import fastretri.train

    config = tmp_path / "timm.yml"
    config.write_text(TIMM_YML.format(base=Path(fastretri.train.__file__).parent / "configs" / "cub.yml"))
    args = ["--config-file", str(config), "--data_path", str(data), "--num-gpus", "0"]
    fastretri.train.main(fastretri.train.get_args_parser().parse_args(args))
    run = "cub_uncropped_timm-convnext_atto"
    metrics = _retest(fastretri.test, results / "fastretri", run, data)
    _check_run(results / "fastretri", run, "MODEL.BACKBONE.NAME", "timm:convnext_atto", metrics)


ENSEMBLE = ["--data_name", "cub", "--image_size", "32", "--batch_size", "8", "--ensemble_size", "3"]
ENSEMBLE += ["--meta_class_size", "2", "--pretrained", "none", "--num_workers", "0", "--gpu_ids", ""]
ENSEMBLE += ["--num_epochs", "1", "--recalls", "1,2", "--model_selection", "last"]


def test_reir_with_a_timm_resnet(data, results):
    import reir.test
    import reir.train

    flags = ["--data_path", str(data), *ENSEMBLE, "--model_type", "timm:resnet10t"]
    with pytest.raises(UserError, match="shared whole .* use --share_type layer4"):
        reir.train.main(reir.train.get_args_parser().parse_args(flags))
    reir.train.main(reir.train.get_args_parser().parse_args([*flags, "--share_type", "layer4"]))
    run = "cub_uncropped_fixed_unrandom_layer4_timm-resnet10t_3_2"
    metrics = _retest(reir.test, results / "reir", run, data)
    _check_run(results / "reir", run, "model_type", "timm:resnet10t", metrics)


def test_sreml_with_a_convnext_shares_it_whole(data, results, capsys):
    import sreml.test
    import sreml.train

    flags = ["--data_path", str(data), *ENSEMBLE, "--model_type", "timm:convnext_atto"]
    sreml.train.main(sreml.train.get_args_parser().parse_args(flags))
    assert "a timm backbone is shared whole" in capsys.readouterr().out
    run = "cub_uncropped_timm-convnext_atto"
    metrics = _retest(sreml.test, results / "sreml", run, data)
    _check_run(results / "sreml", run, "model_type", "timm:convnext_atto", metrics)
    assert torch.load(results / "sreml" / f"{run}_model.pth", weights_only=True)["config"]["share_type"] == "layer4"
