"""The original's outputs/<dataset>/encoder.pth (a bare timm state dict) evaluated by irt/test.py."""

import pytest
import timm
import torch

from common.errors import UserError
from irt import test as irt_test
from irt.spec import import_original
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
