"""IRT embedding (CLS / distilled rules against timm's own outputs), the original's encoder.pth, weight loading,
optimizer groups and the resumable batch stream."""

import pytest
import timm
import torch
import torch.nn.functional as F

from common.errors import UserError
from irt.model import (
    build_model,
    is_original_encoder,
    load_original_encoder,
    original_model_name,
    parse_model_kwargs,
    save_original_encoder,
)
from irt.xbm import MomentumEncoder

DISTILLED = "deit_tiny_distilled_patch16_224"

TINY = {"patch_size": 8, "depth": 2}


def _tiny(name="vit_tiny_patch16_224", **kw):
    torch.manual_seed(0)
    return build_model(name, "none", 32, drop_path=0.0, model_kwargs=dict(TINY, **kw.pop("extra", {})), **kw)


def test_embedding_is_normalised_final_norm_cls_token():
    model = _tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    z = model(x)
    assert z.shape == (3, 192)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-6)
    tokens = model.backbone.norm(model.backbone.blocks(model.backbone._pos_embed(model.backbone.patch_embed(x))))
    assert torch.allclose(z, F.normalize(tokens[:, 0], dim=1), atol=1e-5)


def _timm_distilled(**kw):
    """The original's backbone call: create_model(name, num_classes=0, drop_rate, drop_path_rate, drop_block_rate)."""
    return timm.create_model(
        DISTILLED, pretrained=False, num_classes=0, drop_rate=0.0, drop_block_rate=None, img_size=32, **TINY, **kw
    )


def test_original_rule_is_timms_train_and_eval_outputs():
    """Train mode: element 0 of timm's (cls, dist) tuple (timm 0.5.4 returned the tuple whenever training; today's
    timm does with set_distilled_training). Eval mode: timm's (cls + dist) / 2. The key encoder, never put in eval
    mode, gives the CLS token too."""
    torch.manual_seed(0)
    reference = _timm_distilled(drop_path_rate=0.0).double()
    reference.set_distilled_training(True)
    ours = build_model(DISTILLED, "none", 32, drop_path=0.0, model_kwargs=TINY).double()  # default rule: original
    ours.backbone.load_state_dict(reference.state_dict())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        cls, dist = reference.train()(x)
        average = reference.eval()(x)
        assert not torch.allclose(cls, average)
        assert torch.allclose(ours.train()(x), F.normalize(cls, dim=1), atol=1e-12)
        assert torch.allclose(ours.eval()(x), F.normalize(average, dim=1), atol=1e-12)
        key = MomentumEncoder(ours.eval(), 0.999)
        assert torch.allclose(key(x), F.normalize(cls, dim=1), atol=1e-12)


@pytest.mark.parametrize("rule", ["mean", "cls"])
def test_distilled_rule_is_the_same_in_train_and_eval(rule):
    model = _tiny("deit_tiny_distilled_patch16_224", distilled_embedding=rule)
    assert model.distilled
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    expected = (tokens[:, 0] + tokens[:, 1]) / 2 if rule == "mean" else tokens[:, 0]
    with torch.no_grad():
        train_z = model.train()(x)
        eval_z = model.eval()(x)
    assert torch.allclose(train_z, eval_z, atol=1e-6)
    assert torch.allclose(eval_z, F.normalize(expected, dim=1), atol=1e-5)


def test_state_dict_path_loads_and_ignores_heads(tmp_path):
    source = _tiny()
    state = {f"backbone.{k}": v for k, v in source.backbone.state_dict().items()}
    torch.save({"model": state, "config": {}}, tmp_path / "ours.pth")
    plain = dict(source.backbone.state_dict(), **{"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)})
    torch.save(plain, tmp_path / "timm.pth")
    x = torch.randn(2, 3, 32, 32)
    for name in ("ours.pth", "timm.pth"):
        loaded = build_model("vit_tiny_patch16_224", str(tmp_path / name), 32, drop_path=0.0, model_kwargs=TINY)
        assert torch.allclose(loaded.eval()(x), source.eval()(x), atol=1e-6)


def _write_like_the_original(path, name=DISTILLED, **kw):
    """engine.train's last line: torch.save(encoder.state_dict(), <output-dir>/<dataset>/encoder.pth)."""
    torch.manual_seed(1)
    encoder = timm.create_model(
        name, pretrained=False, num_classes=0, drop_rate=0.0, drop_path_rate=0.1, drop_block_rate=None, **kw
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), path)
    return encoder


def test_original_encoder_file_loads(tmp_path):
    path = tmp_path / "outputs" / "cub200" / "encoder.pth"
    encoder = _write_like_the_original(path, img_size=32, **TINY)
    assert is_original_encoder(str(path))
    model = load_original_encoder(str(path), DISTILLED, 32, TINY)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), F.normalize(encoder.eval()(x), dim=1), atol=1e-6)


def test_original_encoder_model_is_recognised(tmp_path):
    """Without a model name, the file's shapes pick the DeiT of the original's README (here DeiT-T, full size)."""
    path = tmp_path / "encoder.pth"
    encoder = _write_like_the_original(path, "deit_tiny_patch16_224")
    model = load_original_encoder(str(path))
    assert not model.distilled and model.backbone.patch_embed.grid_size == (14, 14)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), F.normalize(encoder.eval()(x), dim=1), atol=1e-5)
    for name in ("deit_small_distilled_patch16_224", "deit_base_patch16_224"):
        with torch.device("meta"):  # shapes only
            state = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
        assert original_model_name(state) == name
    assert original_model_name(_tiny().backbone.state_dict()) is None  # patch 8, depth 2: the name must be given


def test_original_encoder_that_does_not_fit_is_one_line(tmp_path):
    path = tmp_path / "encoder.pth"
    _write_like_the_original(path, img_size=32, **TINY)
    with pytest.raises(UserError, match=r"unexpected dist_token.*distilled model") as e:
        load_original_encoder(str(path), "vit_tiny_patch16_224", 32, TINY)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"shape pos_embed \(1, 18, 192\) vs \(1, 38, 192\)"):
        load_original_encoder(str(path), DISTILLED, 48, TINY)
    with pytest.raises(UserError, match="give the timm model name"):
        load_original_encoder(str(path))
    torch.save({"model": {}, "config": {}}, tmp_path / "ours.pth")
    assert not is_original_encoder(str(tmp_path / "ours.pth"))
    with pytest.raises(UserError, match="model file of this toolkit"):
        load_original_encoder(str(tmp_path / "ours.pth"), DISTILLED, 32, TINY)


def test_saved_encoder_is_the_originals_file(tmp_path):
    """What --output-dir writes loads strictly into the timm model the original builds, and back into ours."""
    model = _tiny(DISTILLED)
    save_original_encoder(model, tmp_path / "encoder.pth")
    state = torch.load(tmp_path / "encoder.pth", weights_only=True)
    reference = _timm_distilled(drop_path_rate=0.1)
    reference.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(F.normalize(reference.eval()(x), dim=1), model.eval()(x), atol=1e-6)
        assert torch.allclose(
            load_original_encoder(str(tmp_path / "encoder.pth"), DISTILLED, 32, TINY).eval()(x), model(x), atol=1e-6
        )


def _original_dropout_places(depth: int) -> set:
    """Where timm 0.5.4's VisionTransformer(drop_rate=p) put nn.Dropout(p): after adding the position embedding
    (pos_drop), after each block's attention output projection (attn.proj_drop) and after both MLP layers
    (mlp.drop1, mlp.drop2). The attention map's dropout took attn_drop_rate (0 in the original); no head dropout."""
    places = {"pos_drop"}
    for i in range(depth):
        places |= {f"blocks.{i}.attn.proj_drop", f"blocks.{i}.mlp.drop1", f"blocks.{i}.mlp.drop2"}
    return places


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_drop_is_applied_where_the_originals_timm_applied_it(p):
    model = _tiny(drop=p)
    active = {n: m.p for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
    places = _original_dropout_places(TINY["depth"])
    # head_drop is timm's classifier-head dropout: IRT never calls the head (the embedding is the final-norm token)
    assert {n: v for n, v in active.items() if n != "head_drop"} == ({k: p for k in places} if p else {})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first, second = model.train()(x), model(x)
        assert torch.equal(first, second) == (p == 0)  # drop_path is 0: only dropout makes passes differ
        assert torch.equal(model.eval()(x), model(x))


def test_state_dict_of_other_size_resamples_position_embedding(tmp_path):
    torch.save(_tiny().backbone.state_dict(), tmp_path / "w.pth")  # 32 px: 4x4 patches
    model = build_model("vit_tiny_patch16_224", str(tmp_path / "w.pth"), 48, model_kwargs=TINY)  # 6x6 patches
    assert model.backbone.pos_embed.shape == (1, 37, 192)


@pytest.mark.parametrize("name, error", [("resnet18", "Vision Transformer"), ("no_such_vit", "not a timm model")])
def test_bad_model_is_a_user_error(name, error):
    with pytest.raises(UserError, match=error):
        build_model(name, "none", None, model_kwargs={})


def test_bad_pretrained_path_is_a_user_error(tmp_path):
    torch.save({"blocks.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="does not fit"):
        build_model("vit_tiny_patch16_224", str(tmp_path / "bad.pth"), 32, model_kwargs=TINY)
    with pytest.raises(UserError, match="no such file"):
        build_model("vit_tiny_patch16_224", str(tmp_path / "missing.pth"), 32, model_kwargs=TINY)


def test_model_kwargs_parsing():
    assert parse_model_kwargs(["depth=2", "mlp_ratio=2.5", "qkv_bias=false", "act=gelu"]) == {
        "depth": 2,
        "mlp_ratio": 2.5,
        "qkv_bias": False,
        "act": "gelu",
    }
    with pytest.raises(UserError):
        parse_model_kwargs(["depth"])


def test_no_weight_decay_on_biases_norms_position_and_tokens():
    from irt.train import build_optimizer, get_args_parser

    model = _tiny("deit_tiny_distilled_patch16_224")
    args = get_args_parser().parse_args([])
    no_decay, decay = build_optimizer(model, args).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 5e-4
    assert {
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.dist_token",
        "backbone.norm.weight",
        "backbone.blocks.0.attn.qkv.bias",
    } <= skipped
    assert {names[id(p)] for p in decay["params"]} >= {
        "backbone.blocks.0.attn.qkv.weight",
        "backbone.patch_embed.proj.weight",
    }
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))
