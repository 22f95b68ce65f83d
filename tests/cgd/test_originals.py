"""leftthomas/CGD's own files (no stored configuration) work with test.py / inference.py / ablation.py."""

import pytest
import torch
import torchvision
from PIL import Image

from cgd import inference
from cgd import test as cgd_test
from cgd.model import Model
from cgd.spec import import_original, original_config
from common.errors import UserError
from tests.tiny import make_tiny_processed

RUN = "cub_uncropped_resnet18_SG_64_0.1_0.5_0.1_8"


def _original_keys(backbone: torchvision.models.ResNet, gd_config: str):
    """The state-dict keys leftthomas/CGD's Model has: the ResNet's children without avgpool/fc renumbered as
    ``features.<i>``, ``main_modules.<i>.0.weight`` per descriptor, ``auxiliary_module.{0,1}.*``."""
    names = [n for n, _ in backbone.named_children() if n not in ("avgpool", "fc")]
    keys = set()
    for key in backbone.state_dict():
        child, rest = key.split(".", 1)
        if child in names:
            keys.add(f"features.{names.index(child)}.{rest}")
    keys |= {f"main_modules.{i}.0.weight" for i in range(len(gd_config))}
    keys |= {
        f"auxiliary_module.0.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    return keys | {"auxiliary_module.1.weight", "auxiliary_module.1.bias"}


def test_state_dict_layout_is_the_originals():
    model = Model("resnet18", "SMG", 96, 7)
    assert set(model.state_dict()) == _original_keys(torchvision.models.resnet18(), "SMG")


@pytest.fixture
def original_run(tmp_path, monkeypatch):
    """A model and a database written the way leftthomas/CGD's train.py writes them (state dict; dict of lists
    and a features tensor, no configuration)."""
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=8, per_class=6, size=40)
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    torch.manual_seed(0)
    model = Model("resnet18", "SG", 64, 4).eval()
    folder = tmp_path / "results" / "cgd"
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / f"{RUN}_model.pth")
    images = sorted(str(p) for p in data.glob("cub/images/00[5-8].*/*.jpg"))
    labels = [int(p.split("/")[-2][:3]) - 5 for p in images]
    from cgd.transforms import cgd_transform

    tf = cgd_transform(False, None)
    with torch.no_grad():
        features = model(torch.stack([tf(Image.open(p).convert("RGB")) for p in images]))[0]
    torch.save(
        {"test_images": images, "test_labels": labels, "test_features": features}, folder / f"{RUN}_data_base.pth"
    )
    return data, folder, model, images


def test_settings_come_from_the_file_name(tmp_path):
    cfg = original_config(tmp_path / "car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128_model.pth", "_model.pth")
    assert (
        cfg["data_name"],
        cfg["crop_type"],
        cfg["backbone_type"],
        cfg["gd_config"],
        cfg["feature_dim"],
        cfg["batch_size"],
    ) == ("car", "uncropped", "resnet50", "SG", 1536, 128)
    with pytest.raises(UserError, match="as leftthomas/CGD names its files"):
        original_config(tmp_path / "mymodel_model.pth", "_model.pth")


def test_original_database_and_model_answer_queries(original_run, tmp_path):
    data, folder, model, images = original_run
    args = ["--data_base", f"{RUN}_data_base.pth", "--retrieval_num", "3"]
    stored = inference.main(inference.get_args_parser().parse_args(args + ["--query_img_name", images[0]]))[0][1]
    assert len(stored) == 3 and images[0] not in [p for p, _, _ in stored]
    new = tmp_path / "new.png"
    Image.open(images[0]).save(new)  # a new file: embedded by the original model file beside the database
    fresh = inference.main(inference.get_args_parser().parse_args(args + ["--query_img_name", str(new)]))[0][1]
    assert fresh[0][0] == images[0] and fresh[0][2] < 1e-3


def test_test_script_on_original_files(original_run):
    data, folder, model, _ = original_run
    metrics = cgd_test.main(
        cgd_test.get_args_parser().parse_args(
            ["--data_base", f"{RUN}_data_base.pth", "--data_path", str(data), "--num_workers", "0", "--recalls", "1,2"]
        )
    )
    assert 0 <= metrics["test_recall@1"] <= 100 and (folder / f"{RUN}_test_metrics.csv").is_file()


def test_mismatching_original_model_is_refused_in_one_line(original_run):
    _, folder, _, _ = original_run
    other = folder / "cub_uncropped_resnet18_SG_128_0.1_0.5_0.1_8_model.pth"  # name says 128-d, weights are 64-d
    other.write_bytes((folder / f"{RUN}_model.pth").read_bytes())
    with pytest.raises(UserError, match=r"main_modules\.0\.0\.weight \(32, 512\) vs \(64, 512\)"):
        import_original(other)


def test_database_embedded_with_original_model_answers_new_images(original_run, tmp_path):
    """test.py --model_file <run>_model.pth (the original's) --save_data_base writes a database that records the
    file; inference.py embeds a new image with it (a copy of a stored image is found at distance 0)."""
    data, folder, model, images = original_run
    out = tmp_path / "embedded.pth"
    args = ["--model_file", str(folder / f"{RUN}_model.pth"), "--data_path", str(data), "--num_workers", "0"]
    cgd_test.main(cgd_test.get_args_parser().parse_args(args + ["--recalls", "1", "--save_data_base", str(out)]))
    assert torch.load(out, weights_only=True)["config"]["model_file"] == str((folder / f"{RUN}_model.pth").resolve())
    new = tmp_path / "new.png"
    Image.open(images[2]).save(new)
    args = ["--data_base", str(out), "--query_img_name", str(new), "--retrieval_num", "2"]
    fresh = inference.main(inference.get_args_parser().parse_args(args))[0][1]
    assert fresh[0][0] == images[2] and fresh[0][2] < 1e-3
