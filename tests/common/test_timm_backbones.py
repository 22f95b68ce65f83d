"""common.backbones with timm models: the ViT token -> map rule against independent computations, weights from a
state dict / safetensors file / the Hugging Face cache (offline), one-line refusals, argparse names, run names."""

import os

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from common.backbones import backbone_choice, build_backbone, build_resnet, fixed_input_size, tokens_to_map
from common.errors import UserError, run_cli
from common.runs import run_name

VIT = "timm:vit_tiny_patch16_224"


def test_tokens_to_map_row_major_after_prefix():
    """Token k after the p prefix tokens is patch (k // W, k % W); prefix tokens (class, register ...) are dropped."""
    b, prefix, h, w, c = 2, 5, 3, 4, 6
    tokens = torch.randn(b, prefix + h * w, c)
    fmap = tokens_to_map(tokens, prefix, (h, w))
    assert fmap.shape == (b, c, h, w)
    for i in range(h):
        for j in range(w):
            assert torch.equal(fmap[:, :, i, j], tokens[:, prefix + i * w + j])
    with pytest.raises(UserError, match="do not fill a 3 x 3 patch grid"):
        tokens_to_map(tokens, prefix, (3, 3))


@pytest.mark.parametrize("name,prefix", [(VIT, 1), ("timm:deit_tiny_distilled_patch16_224", 2)])
def test_vit_map_is_the_patch_tokens_on_their_grid(name, prefix):
    """A non-square input (64 x 48 -> 4 x 3 patches): the map equals the patch tokens of ``forward_features``
    reshaped independently, with the class (and distillation) token(s) left out."""
    torch.manual_seed(0)
    backbone, channels = build_backbone(name, "none")
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        fmap = backbone.eval()(x)
        tokens = backbone.model.forward_features(x)
    assert tokens.shape[1] == prefix + 4 * 3 and channels == tokens.shape[2] == 192
    expected = torch.stack([torch.stack([tokens[:, prefix + 3 * i + j] for j in range(3)], -1) for i in range(4)], -2)
    assert fmap.shape == (2, 192, 4, 3) and torch.equal(fmap, expected)


def test_vit_map_has_the_image_orientation():
    """With the transformer removed (no blocks, no norm, zero position embedding) the map is exactly the patch
    embedding convolution's output: patch (i, j) of the map is the image patch (i, j)."""
    torch.manual_seed(0)
    backbone, _ = build_backbone(VIT, "none")
    vit = backbone.model
    vit.blocks, vit.norm = nn.Sequential(), nn.Identity()
    with torch.no_grad():
        vit.pos_embed.zero_()
        x = torch.randn(1, 3, 48, 80)
        assert torch.allclose(backbone.eval()(x), vit.patch_embed.proj(x), atol=1e-6)


@pytest.mark.parametrize("name", ["timm:convnext_atto", "timm:resnet10t"])
def test_cnn_map_and_pooled_features(name):
    torch.manual_seed(0)
    backbone, channels = build_backbone(name, "none")
    pooled, dim = build_backbone(name, "none", pooled=True)
    pooled.load_state_dict(backbone.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap, feats = backbone.eval()(x), pooled.eval()(x)
        assert torch.equal(fmap, backbone.model.forward_features(x))
    assert fmap.shape == (2, channels, 2, 2) and feats.shape == (2, dim)
    if name.endswith("resnet10t"):  # timm's ResNet head: a plain global average pool
        assert torch.allclose(feats, fmap.mean(dim=(2, 3)), atol=1e-5)


def _same(a: nn.Module, b: dict) -> bool:
    own = a.state_dict()
    return set(own) == set(b) and all(torch.equal(own[k], b[k]) for k in own)


def test_pretrained_path_state_dict_and_safetensors(tmp_path):
    """A timm state dict with its classifier (dropped: the backbone has none), as .pth, wrapped .pth under 'model'
    with DDP's prefix, and .safetensors: the weights arrive unchanged."""
    torch.manual_seed(0)
    source = timm.create_model("convnext_atto")
    state = source.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
    torch.save(state, tmp_path / "w.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    for file in ("w.pth", "wrapped.pth", "w.safetensors"):
        backbone, _ = build_backbone("timm:convnext_atto", str(tmp_path / file))
        assert _same(backbone.model, body), file


def test_resnet_trunk_from_safetensors(tmp_path):
    """torchvision ResNets read .safetensors too; the trunk is conv1 ... layer4 with those weights, in order."""
    torch.manual_seed(0)
    resnet = build_resnet("resnet18", "none")
    save_file(resnet.state_dict(), str(tmp_path / "r18.safetensors"))
    trunk, channels = build_backbone("resnet18", str(tmp_path / "r18.safetensors"))
    expected = [v for k, v in resnet.state_dict().items() if not k.startswith("fc.")]
    assert channels == 512 and len(trunk.state_dict()) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), expected))


@pytest.mark.parametrize(
    "write,match",
    [
        (lambda p: p.with_suffix(".pth").write_text("not weights"), "cannot read it as a PyTorch state dict"),
        (lambda p: p.with_suffix(".safetensors").write_bytes(b"\x00" * 40), "cannot read it as a safetensors file"),
        (lambda p: torch.save(torch.zeros(3), p.with_suffix(".pth")), "holds no state dict"),
        (lambda p: torch.save(timm.create_model("resnet10t").state_dict(), p.with_suffix(".pth")), "does not fit"),
    ],
)
def test_wrong_weight_file_is_one_error_line(tmp_path, capsys, write, match):
    path = tmp_path / "weights"
    write(path)
    (file,) = [p for p in tmp_path.iterdir()]
    with pytest.raises(UserError, match=match):
        build_backbone("timm:convnext_atto", str(file))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda _: build_backbone("timm:convnext_atto", str(file)), None)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


def _fake_hub_cache(root, repo: str, state: dict) -> None:
    """The Hugging Face cache layout: models--<org>--<name>/{refs/main, snapshots/<rev>/model.safetensors}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    save_file(state, str(folder / "snapshots" / "0123abcd" / "model.safetensors"))


def test_imagenet_reads_the_hub_cache_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm.models._hub

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network)
    torch.manual_seed(1)
    source = timm.create_model("resnet10t")
    _fake_hub_cache(tmp_path, timm.models.get_pretrained_cfg("resnet10t").hf_hub_id, source.state_dict())
    backbone, _ = build_backbone("timm:resnet10t", "imagenet")
    assert _same(backbone.model, {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")})


def test_imagenet_offline_without_cache_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the Hugging Face cache .* --pretrained PATH .* --pretrained none"):
        build_backbone("timm:convnext_atto", "imagenet")


def test_imagenet_not_cached_probes_the_hub_once_then_one_line(tmp_path, monkeypatch):
    """The timm backbones share the weights probe of common.hub: one connection attempt to the hub (through the
    proxy when one applies), then the one-line refusal naming the weights and the cache folder."""
    import huggingface_hub.constants

    import common.hub as hub

    probes = []

    def refuse(host, port, timeout):
        probes.append((host, port, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "_connect", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError) as refused:
        build_backbone("timm:convnext_atto", "imagenet")
    message = str(refused.value)
    assert "\n" not in message and "timm:convnext_atto" in message and str(tmp_path) in message
    assert "--pretrained PATH" in message and "--pretrained none" in message
    assert probes == [("proxy.example", 3128, hub.PROBE_TIMEOUT)]


def test_backbone_names_on_the_command_line():
    parse = backbone_choice(("resnet18", "resnet50"))
    assert parse("resnet18") == "resnet18"
    assert parse("timm:vit_small_patch16_224.dino") == "timm:vit_small_patch16_224.dino"
    for bad in ("resnet101", "timm:no_such_model_xyz", "vit_small_patch16_224"):
        with pytest.raises(Exception, match="not a model|invalid choice"):
            parse(bad)
    from cgd.train import get_args_parser

    args = get_args_parser().parse_args(["--backbone_type", "timm:convnext_atto"])
    assert args.backbone_type == "timm:convnext_atto"
    with pytest.raises(SystemExit) as exit_info:
        get_args_parser().parse_args(["--backbone_type", "timm:no_such_model_xyz"])
    assert exit_info.value.code == 2


def test_run_names_are_file_names():
    name = run_name("car", "uncropped", "timm:vit_small_patch16_224.dino", "hf:org/model")
    assert name == "car_uncropped_timm-vit_small_patch16_224.dino_hf-org-model"
    assert os.sep not in name and ":" not in name


def test_fixed_input_size_for_export_keeps_outputs_and_the_model():
    """Export rebuilds a dynamic-size ViT for one input size: same outputs there, no resize in the traced graph
    (checked by the export tests), and the model it was given keeps its dynamic size."""
    from cgd.model import Model

    torch.manual_seed(0)
    model = Model(VIT, "SG", 16, 3).eval()
    fixed = fixed_input_size(model, (48, 32))
    assert fixed is not model and model.features.model.dynamic_img_size
    assert not fixed.features.model.dynamic_img_size and fixed.features.model.pos_embed.shape[1] == 1 + 3 * 2
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        assert torch.allclose(fixed(x)[0], model(x)[0], atol=1e-5)
    resnet = Model("resnet18", "SG", 16, 3)
    assert fixed_input_size(resnet, (48, 32)) is resnet


def test_irt_reads_safetensors_through_the_shared_loader(tmp_path):
    from irt.model import build_model

    tiny = {"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 8}
    torch.manual_seed(0)
    source = build_model("vit_tiny_patch16_224", "none", 32, drop_path=0.0, model_kwargs=tiny)
    save_file(source.backbone.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = build_model("vit_tiny_patch16_224", str(tmp_path / "w.safetensors"), 32, drop_path=0.0, model_kwargs=tiny)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), source.eval()(x), atol=1e-6)
