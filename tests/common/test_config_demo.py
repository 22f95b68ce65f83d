"""Config files (``--config FILE.yaml``), the demo's settings, worker defaults and offline weights failing fast."""

import argparse
import os

import pytest
import torch
import yaml

import common.cli as cli
import common.hub as hub
from cgd import train as cgd_train
from common.cli import parse_args_with_config, write_args_yaml
from common.errors import UserError
from fastretri import train as fastretri_train
from fastretri.config import load_config, resolve_config, write_config
from irt import train as irt_train
from reir import train as reir_train
from sreml import train as sreml_train

METHODS = {"cgd": cgd_train, "reir": reir_train, "sreml": sreml_train, "irt": irt_train}
DATA_FLAG = {"cgd": "--data_name", "reir": "--data_name", "sreml": "--data_name", "irt": "--dataset"}


def _parse(method, argv, capsys=None):
    module = METHODS[method]
    return parse_args_with_config(module.get_args_parser(), argv, demo=module.DEMO)


def _config(tmp_path, values, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _error(capsys, method, argv):
    with pytest.raises(SystemExit) as e:
        _parse(method, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    return err[0]


# ---- config files ------------------------------------------------------------------------------------------------


def test_config_sets_flags_and_the_command_line_wins(tmp_path):
    path = _config(
        tmp_path,
        {"batch_size": 32, "lr": "1e-3", "backbone_type": "resnet18", "freeze_bn": False, "recalls": [1, 2]},
    )
    args = _parse("cgd", ["--config", path, "--batch_size", "16"])
    assert (args.batch_size, args.lr, args.backbone_type, args.freeze_bn, args.recalls) == (
        16,
        1e-3,
        "resnet18",
        False,
        [1, 2],
    )
    # everything else keeps the parser's default
    plain = cgd_train.get_args_parser().parse_args(["--batch_size", "16"])
    changed = {k for k in vars(plain) if getattr(plain, k) != getattr(args, k)}
    assert changed == {"lr", "backbone_type", "freeze_bn", "recalls", "config"}


def test_irt_config_takes_hyphenated_and_original_names(tmp_path):
    path = _config(tmp_path, {"max-iter": 5, "dataset": "sop", "rank": [1, 10], "lambda_reg": 0.0, "pin-mem": False})
    args = _parse("irt", ["-c", path, "--max-iter", "7"])
    assert (args.max_iter, args.data_name, args.rank, args.lambda_reg, args.pin_mem) == (7, "sop", [1, 10], 0.0, False)
    assert _parse("irt", ["-c", _config(tmp_path, {"recalls": "1,4"})]).rank == [1, 4]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"batchsize": 3}, "unknown key 'batchsize' (did you mean batch_size?)"),
        ({"batch_size": -1}, "batch_size: expected an integer greater than 0"),
        ({"backbone_type": "vgg16"}, "backbone_type: invalid choice 'vgg16'"),
        ({"freeze_bn": "yes"}, "freeze_bn: expected true or false"),
        ({"no_freeze_bn": True}, "unknown key 'no_freeze_bn' (did you mean freeze_bn?)"),
        ({"lr": None}, "lr: null is allowed only"),
    ],
)
def test_bad_config_is_one_error_line(tmp_path, capsys, values, message):
    assert message in _error(capsys, "cgd", ["--config", _config(tmp_path, values)])


def test_unreadable_config_files(tmp_path, capsys):
    assert "no such file" in _error(capsys, "cgd", ["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "mapping" in _error(capsys, "cgd", ["--config", str(tmp_path / "list.yaml")])
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    assert "not valid YAML" in _error(capsys, "cgd", ["--config", str(tmp_path / "bad.yaml")])


def test_fixed_keys_of_a_setting_read_back_only_with_their_value(tmp_path, capsys):
    assert _parse("sreml", ["--config", _config(tmp_path, {"label_type": "random", "method": "sreml"})])
    assert "label_type is fixed to 'random'" in _error(
        capsys, "sreml", ["--config", _config(tmp_path, {"label_type": "fixed"})]
    )


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("data", ["demo", "cub"])
def test_args_yaml_round_trip(tmp_path, method, data, capsys):
    """A run's args.yaml, given back with --config, resolves to the same arguments (demo settings included), except
    --resume: a repeat starts afresh."""
    args = _parse(method, [DATA_FLAG[method], data, "--seed", "3", "--num_workers", "1", "--resume"])
    path = write_args_yaml(args, tmp_path / "run_args.yaml", f"{method}/train.py")
    assert path.read_text().startswith(f"# resolved arguments; repeat the run with: python {method}/train.py")
    assert not {"config", "resume"} & set(yaml.safe_load(path.read_text()))
    again = _parse(method, ["--config", str(path)])
    assert args.resume == "auto" and again.resume is None
    assert {k: v for k, v in vars(again).items() if k not in ("config", "resume")} == {
        k: v for k, v in vars(args).items() if k not in ("config", "resume")
    }
    # and a flag given with it still wins
    assert _parse(method, ["--config", str(path), "--seed", "5"]).seed == 5


# ---- demo settings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_demo_fills_only_the_flags_not_given(method, capsys):
    """Independent restatement: the demo's flags followed by the user's (argparse: the last one wins)."""
    module = METHODS[method]
    user = [DATA_FLAG[method], "demo", "--seed", "4", "--lr", "0.5"]
    args = _parse(method, user)
    assert args == module.get_args_parser().parse_args(module.DEMO + user)
    out = capsys.readouterr().out
    assert out.startswith("demo settings: ") and "--lr" not in out and "--seed" not in out
    assert _parse(method, user + ["--pretrained", "none"]).pretrained == "none"


def test_demo_settings_yield_to_a_config_file(tmp_path, capsys):
    path = _config(tmp_path, {"data_name": "demo", "num_epochs": 2, "backbone_type": "resnet34"})
    args = _parse("cgd", ["--config", path])
    assert (args.num_epochs, args.backbone_type, args.image_size, args.pretrained) == (2, "resnet34", 32, "none")
    printed = capsys.readouterr().out
    assert "--num_epochs" not in printed and "--backbone_type" not in printed and "--image_size 32" in printed


@pytest.mark.parametrize("method", list(METHODS))
def test_real_datasets_keep_the_originals_defaults(method, capsys):
    module = METHODS[method]
    args = _parse(method, [DATA_FLAG[method], "cub"])
    assert args == module.get_args_parser().parse_args([DATA_FLAG[method], "cub"])
    assert capsys.readouterr().out == ""
    original = {
        "cgd": dict(backbone_type="resnet50", pretrained="imagenet", freeze_bn=True, lr=1e-4, batch_size=128),
        "reir": dict(model_type="resnet18", ensemble_size=48, meta_class_size=12, lr=1e-4, batch_size=10),
        "sreml": dict(model_type="resnet18", ensemble_size=48, meta_class_size=12, lr=1e-4, batch_size=12),
        "irt": dict(model="deit_small_distilled_patch16_224", lr=3e-5, batch_size=64, max_iter=2000, lambda_reg=0.7),
    }[method]
    assert {k: getattr(args, k) for k in original} == original


# ---- worker defaults ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cores, cgd, irt", [(2, 2, 2), (8, 4, 8), (64, 4, 16)])
def test_default_workers_fit_the_cores(monkeypatch, cores, cgd, irt):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert cgd_train.get_args_parser().parse_args([]).num_workers == cgd
    assert reir_train.get_args_parser().parse_args([]).num_workers == cgd
    assert irt_train.get_args_parser().parse_args([]).num_workers == irt
    assert cgd_train.get_args_parser().parse_args(["--num_workers", "7"]).num_workers == 7


def test_fastretri_workers_capped_unless_chosen(monkeypatch, capsys):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    parse = fastretri_train.get_args_parser().parse_args
    assert resolve_config(parse(["--config-file", "fastretri/configs/cub.yml"]))["DATALOADER"]["NUM_WORKERS"] == 2
    assert "NUM_WORKERS 8 > the 2 cores available; using 2" in capsys.readouterr().out
    assert resolve_config(parse(["--num_workers", "6"]))["DATALOADER"]["NUM_WORKERS"] == 6
    assert resolve_config(parse(["DATALOADER.NUM_WORKERS", "5"]))["DATALOADER"]["NUM_WORKERS"] == 5
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert resolve_config(parse([]))["DATALOADER"]["NUM_WORKERS"] == 8  # fast-reid's own default


def test_fastretri_resolved_config_reads_back(tmp_path):
    args = fastretri_train.get_args_parser().parse_args(
        ["--config", "fastretri/configs/sop.yml", "--batch_size", "64", "SOLVER.BASE_LR", "0.02"]
    )
    cfg = resolve_config(args)
    path = write_config(cfg, tmp_path / "run_config.yaml")
    assert load_config(path) == cfg and cfg["SOLVER"]["BASE_LR"] == 0.02 and cfg["SOLVER"]["IMS_PER_BATCH"] == 64


# ---- offline weights: one attempt, then the one-line error -------------------------------------------------------


@pytest.fixture
def probes(monkeypatch):
    """Count the connection attempts; none succeeds (no network)."""
    calls = []

    def refuse(host, port, timeout):
        calls.append((host, port, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "_connect", refuse)
    return calls


def test_torchvision_weights_not_cached_fail_after_one_probe(tmp_path, monkeypatch, probes):
    from common.backbones import build_resnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    downloads = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: downloads.append(a))
    with pytest.raises(UserError, match="cannot load ImageNet weights .*HubUnreachable.*--pretrained none"):
        build_resnet("resnet18", "imagenet")
    assert len(probes) == 1 and probes[0][0] == "download.pytorch.org" and not downloads


def test_torchvision_weights_in_the_cache_need_no_network(tmp_path, monkeypatch, probes):
    from torchvision.models import ResNet18_Weights

    from common.backbones import build_resnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = build_resnet("resnet18", "none")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(
        source.state_dict(), tmp_path / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.split("/")[-1]
    )
    loaded = build_resnet("resnet18", "imagenet")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    assert probes == []


def _hf_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hf"


def test_timm_weights_not_cached_fail_after_one_probe(tmp_path, monkeypatch, probes):
    from huggingface_hub import constants

    from irt.model import build_model

    _hf_cache(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="cannot load ImageNet weights of deit_tiny_patch16_224 .*HubUnreachable"):
        build_model("deit_tiny_patch16_224", "imagenet", input_size=32, model_kwargs={"depth": 1})
    assert len(probes) == 1 and probes[0][0] == constants.ENDPOINT.split("//")[1].split("/")[0]
    assert constants.HF_HUB_OFFLINE is False  # the offline switch was only set around the cache lookup


def test_hf_hub_offline_is_respected_without_any_attempt(tmp_path, monkeypatch, probes):
    from irt.model import build_model

    _hf_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HubUnreachable"):
        build_model("deit_tiny_patch16_224", "imagenet", input_size=32, model_kwargs={"depth": 1})
    assert probes == []


def test_timm_weights_in_the_hf_cache_load_offline(tmp_path, monkeypatch, probes):
    import safetensors.torch
    import timm

    from irt.model import build_model

    cache = _hf_cache(monkeypatch, tmp_path)
    kwargs = {"img_size": 32, "depth": 1, "num_classes": 0}
    source = timm.create_model("deit_tiny_patch16_224", **kwargs)
    repo = cache / "models--timm--deit_tiny_patch16_224.fb_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(source.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    model = build_model("deit_tiny_patch16_224", "imagenet", input_size=32, model_kwargs={"depth": 1})
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), model.backbone.state_dict().values()))
    assert probes == []


def test_reachable_hub_downloads_after_the_cache_lookup(monkeypatch):
    """With a network: the cache is looked up offline, then the probe succeeds and timm downloads (online)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_connect", lambda host, port, timeout: None)
    modes = []

    def create():
        modes.append(constants.HF_HUB_OFFLINE)
        if constants.HF_HUB_OFFLINE:
            raise LocalEntryNotFoundError("not cached")
        return "model"

    assert hub.create_timm("deit_tiny_patch16_224", create) == "model" and modes == [True, False]


def test_probe_goes_through_the_proxy(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert hub._address("https://huggingface.co/x") == ("proxy.example", 3128)
    monkeypatch.setenv("no_proxy", "huggingface.co")
    assert hub._address("https://huggingface.co/x") == ("huggingface.co", 443)


def test_namespace_helper_detects_given_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", default=1, type=int)
    cli.bool_pair(parser, "b", True, "b")
    assert cli.given_dests(parser, ["--a", "1", "--no-b"], ["a", "b"]) == {"a", "b"}
    assert cli.given_dests(parser, [], ["a", "b"]) == set()


@pytest.mark.parametrize("script", ["cgd/train.py", "irt/train.py"])
def test_scripts_read_config_files(tmp_path, script):
    """The scripts themselves parse through parse_args_with_config: a bad key stops them before any work."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(repo / script), "--config", _config(tmp_path, {"num_epoch": 3})],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --config")
    assert "unknown key 'num_epoch'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
