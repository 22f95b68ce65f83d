"""The original's outputs/<dataset>/encoder.pth (a bare timm state dict) evaluated by irt/test.py."""

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import UserError
from irt import inference
from irt import test as irt_test
from irt.spec import import_original
from irt.transforms import irt_transform
from tests.tiny import make_tiny_processed


def _original_encoder(folder):
    """What the original's main.py saved: encoder.state_dict() of timm.create_model(name, num_classes=0)."""
    torch.manual_seed(0)
    encoder = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0)
    folder.mkdir(parents=True)
    torch.save(encoder.state_dict(), folder / "encoder.pth")
    return encoder.eval()


def test_encoder_pth_is_recognised_and_evaluated(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=4, per_class=4, size=40)
    encoder = _original_encoder(tmp_path / "outputs" / "cub200")
    config, model = import_original(tmp_path / "outputs" / "cub200" / "encoder.pth")
    assert config["model"] == "deit_tiny_patch16_224" and config["data_name"] == "cub"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), torch.nn.functional.normalize(encoder(x), dim=1))
    metrics = irt_test.main(
        irt_test.get_args_parser().parse_args(
            [
                "--model_file",
                str(tmp_path / "outputs" / "cub200" / "encoder.pth"),
                "--data-path",
                str(data),
                "--num-workers",
                "0",
                "--recalls",
                "1,2",
            ]
        )
    )
    assert 0 <= metrics["test_recall@1"] <= 100


def test_encoder_outside_a_dataset_folder_is_one_line(tmp_path):
    _original_encoder(tmp_path / "somewhere")
    with pytest.raises(UserError, match="folder named after its dataset"):
        import_original(tmp_path / "somewhere" / "encoder.pth")


def test_database_embedded_with_encoder_pth_answers_new_images(tmp_path, monkeypatch):
    """test.py --model-file encoder.pth --save_data_base writes a database that records the file; inference.py
    then embeds a new image with it: a copy of a stored image finds that image at cosine 1, and the scores are the
    original encoder's own (timm forward, normalised, on the original's test transform)."""
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=4, per_class=3, size=40)
    encoder = _original_encoder(tmp_path / "outputs" / "cub200")
    path = tmp_path / "outputs" / "cub200" / "encoder.pth"
    out = tmp_path / "elsewhere" / "embedded.pth"  # any name, anywhere: nothing lies beside it
    irt_test.main(
        irt_test.get_args_parser().parse_args(
            ["--model_file", str(path), "--data-path", str(data), "--num-workers", "0", "--recalls", "1"]
            + ["--save_data_base", str(out)]
        )
    )
    assert torch.load(out, weights_only=True)["config"]["model_file"] == str(path.resolve())
    stored = torch.load(out, weights_only=True)["splits"]["test"]
    new = tmp_path / "query.png"
    Image.open(stored["images"][1]).save(new)
    args = ["--data_base", str(out), "--query_img_name", str(new), "--retrieval_num", "3"]
    ranked = inference.main(inference.get_args_parser().parse_args(args))[0][1]
    tf = irt_transform(False, 224)
    with torch.no_grad():
        q = F.normalize(encoder(tf(Image.open(new).convert("RGB"))[None]), dim=1)[0]
        g = F.normalize(encoder(torch.stack([tf(Image.open(p).convert("RGB")) for p in stored["images"]])), dim=1)
    expected = (g @ q).topk(3)
    assert [p for p, _, _ in ranked] == [stored["images"][j] for j in expected.indices]
    assert [s for _, _, s in ranked] == pytest.approx(expected.values.tolist(), abs=1e-5)
    assert ranked[0][0] == stored["images"][1] and ranked[0][2] == pytest.approx(1.0, abs=1e-5)
