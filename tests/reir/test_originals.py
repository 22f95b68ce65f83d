"""leftthomas' own REIR / SREML files (leftthomas/NormSoftmax ``2c88830`` / ``edcb745``) work with test.py,
inference.py and ablation.py.

The original model is re-stated here independently of ``reir/model.py``: E separate torchvision ResNets sharing
the stages up to ``share_type``, per-learner ``head`` / ``layer1..4`` ModuleLists and ``classifiers``, with the
original's key names. Its files are written the way the originals wrote them: ``torch.save(model.state_dict())``
and REIR's 9-key database dict of lists and ``[N, E, M]`` tensors (the originals' tensors may be CUDA tensors;
a CPU-only test can only write CPU tensors, the loader maps either with ``map_location='cpu'``).
"""

import shutil

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from common.errors import UserError
from reir import ablation, inference
from reir import test as reir_test
from reir.model import ensemble_embed
from reir.originals import import_reir
from sreml import inference as sreml_inference
from sreml import test as sreml_test
from sreml.originals import import_sreml
from tests.tiny import make_tiny_processed

STAGES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
E, M = 2, 4
RUN = f"cub_uncropped_fixed_unrandom_layer1_resnet18_{E}_{M}"
CUB_MEAN, CUB_STD = (0.4707, 0.4601, 0.4549), (0.2767, 0.2760, 0.2850)  # reir_sreml.md §2.4


class OriginalEnsemble(nn.Module):
    """leftthomas' REIR model (SREML: ``share_type='layer1'`` and ``nested`` classifiers), one device, random init.

    Every BatchNorm gets random affine parameters and running statistics, so a mis-mapped buffer shows."""

    def __init__(self, model_type: str, share_type: str, e: int, m: int, nested: bool = False):
        super().__init__()
        self.e = e
        shared = [] if share_type == "none" else STAGES[: STAGES.index(share_type) + 1]
        base = getattr(torchvision.models, model_type)()
        self.common_extractor = nn.Sequential(*[getattr(base, n) for n in shared])
        self.head = nn.ModuleList()
        for name in ("layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, nn.ModuleList())
        for _ in range(e):
            learner = getattr(torchvision.models, model_type)()
            self.head.append(nn.Sequential(*[getattr(learner, n) for n in STAGES[:4] if n not in shared]))
            for name in ("layer1", "layer2", "layer3", "layer4"):
                if name not in shared:
                    getattr(self, name).append(getattr(learner, name))
        d = base.fc.in_features
        self.classifiers = nn.ModuleList(
            [nn.Sequential(nn.Linear(d, m)) if nested else nn.Linear(d, m) for _ in range(e)]
        )
        self.branch_weight = torch.ones(e)  # the original's unrandom weights (random: softmax(U[0,1)^E))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for bn in (mod for mod in self.modules() if isinstance(mod, nn.BatchNorm2d)):
                bn.weight.uniform_(0.5, 1.5, generator=g)
                bn.bias.uniform_(-0.2, 0.2, generator=g)
                bn.running_mean.uniform_(-0.2, 0.2, generator=g)
                bn.running_var.uniform_(0.5, 2.0, generator=g)
                bn.num_batches_tracked.fill_(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        common = self.common_extractor(x)
        out = []
        for i in range(self.e):
            f = self.branch_weight[i].to(common.dtype) * common
            if len(self.head[i]):
                f = self.head[i](f)
            for name in ("layer1", "layer2", "layer3", "layer4"):
                if len(getattr(self, name)):
                    f = getattr(self, name)[i](f)
            out.append(self.classifiers[i](F.adaptive_avg_pool2d(f, 1).flatten(1)))
        return torch.stack(out, dim=1)


def _original(model_type, share_type, e, m, nested=False, seed=0) -> OriginalEnsemble:
    torch.manual_seed(seed)
    return OriginalEnsemble(model_type, share_type, e, m, nested).eval()


@pytest.mark.parametrize(
    "model_type,share_type,with_random,e",
    [
        ("resnet18", "layer1", False, 3),  # the default (and SREML's layout)
        ("resnet18", "none", True, 3),  # per-learner head.<i>.0 / .1; random branch weights
        ("resnet18", "layer4", False, 3),  # only the heads are private
        ("resnext50_32x4d", "layer2", False, 2),  # grouped convolutions, bottlenecks, downsample
    ],
)
def test_imported_model_equals_the_original_ensemble(tmp_path, model_type, share_type, with_random, e):
    m = 5
    ref = _original(model_type, share_type, e, m)
    flag = "random" if with_random else "unrandom"
    path = tmp_path / f"car_uncropped_random_{flag}_{share_type}_{model_type}_{e}_{m}_model.pth"
    torch.save(ref.state_dict(), path)  # float32, as the original trained and saved
    ref = ref.double()
    if with_random:  # this toolkit evaluates with the expectation 1/E of the original's random weights
        ref.branch_weight = torch.full((e,), 1.0 / e)
    config, model = import_reir(path)
    assert (config["model_type"], config["share_type"], config["with_random"], config["ensemble_size"]) == (
        model_type,
        share_type,
        with_random,
        e,
    )
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = F.normalize(ref(x), dim=-1).flatten(1)  # concatenated per-learner unit logits
        model = model.double().eval()
        for impl in ("loop", "grouped"):
            got = ensemble_embed(model.set_impl(impl), x)
            assert got.shape == (2, e * m)
            assert (got - expected).abs().max().item() <= 1e-9, impl


def test_sreml_file_takes_e_and_m_from_its_weights(tmp_path):
    ref = _original("resnet18", "layer1", 3, 6, nested=True)  # SREML: classifiers.<i>.0.weight
    assert "classifiers.0.0.weight" in ref.state_dict()
    path = tmp_path / "car_cropped_resnet18_model.pth"
    torch.save(ref.state_dict(), path)
    ref = ref.double()
    config, model = import_sreml(path)
    assert (config["method"], config["crop_type"], config["ensemble_size"], config["meta_class_size"]) == (
        "sreml",
        "cropped",
        3,
        6,
    )
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got = ensemble_embed(model.double().eval(), x)
        assert (got - F.normalize(ref(x), dim=-1).flatten(1)).abs().max().item() <= 1e-9


def _eval_transform():
    """REIR's uncropped test transform, restated: Resize(256) -> CenterCrop(256), CUB statistics."""
    return T.Compose([T.Resize(256), T.CenterCrop(256), T.ToTensor(), T.Normalize(CUB_MEAN, CUB_STD)])


def _features(model, paths):
    tf = _eval_transform()
    with torch.no_grad():
        return F.normalize(model(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])), dim=-1)


@pytest.fixture(scope="module")
def original_files(tmp_path_factory):
    """REIR's epochs/<run>_model.pth and results/<run>_data_base.pth, both copied to results/reir/; a second
    (worse) database for the ablation; the tiny dataset they were computed on."""
    root = tmp_path_factory.mktemp("reir_originals")
    data = make_tiny_processed(root / "data", "cub", num_classes=8, per_class=3, size=32)
    folder = root / "results" / "reir"
    folder.mkdir(parents=True)
    model = _original("resnet18", "layer1", E, M)
    torch.save(model.state_dict(), folder / f"{RUN}_model.pth")
    splits = {}
    for split, classes in (("train", "00[1-4]"), ("test", "00[5-8]")):
        paths = sorted(str(p) for p in data.glob(f"cub/images/{classes}.*/*.jpg"))
        names = sorted({p.split("/")[-2] for p in paths})
        splits[split] = (paths, [names.index(p.split("/")[-2]) for p in paths], _features(model, paths))
    db = {}
    for key, split in (("train", "train"), ("test", "test"), ("gallery", "test")):  # gallery IS test (car/cub/sop)
        db[f"{key}_images"], db[f"{key}_labels"], db[f"{key}_features"] = splits[split]
    torch.save(db, folder / f"{RUN}_data_base.pth")
    g = torch.Generator().manual_seed(3)
    worse = {k: v for k, v in db.items()}
    worse["test_features"] = worse["gallery_features"] = F.normalize(
        torch.randn(len(db["test_images"]), E, M, generator=g), dim=-1
    )
    worse_name = f"cub_uncropped_random_unrandom_layer1_resnet18_{E}_{M}_data_base.pth"
    torch.save(worse, folder / worse_name)
    return root, data, folder, db, worse_name


@pytest.fixture
def run_dir(original_files, monkeypatch):
    root = original_files[0]
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(root / "results"))
    return original_files


def _mean_cosine(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """The original's score: mean over learners of per-learner dot products ([E, M] vs [N, E, M])."""
    return (gallery.double() * query.double()).sum(-1).mean(-1)


def test_inference_answers_stored_and_new_queries(run_dir, tmp_path):
    _, _, _, db, _ = run_dir
    images, features = db["test_images"], db["test_features"]
    args = ["--data_base", f"{RUN}_data_base.pth", "--retrieval_num", "3"]
    stored = inference.main(inference.get_args_parser().parse_args(args + ["--query_img_name", images[0]]))[0][1]
    scores = _mean_cosine(features[0], features)
    scores[0] = -2  # self excluded: query and gallery are one split
    best = scores.topk(3).indices.tolist()
    assert [p for p, _, _ in stored] == [images[j] for j in best]
    assert [s for _, _, s in stored] == pytest.approx(scores[best].tolist(), abs=1e-6)
    new = tmp_path / "new.png"
    Image.open(images[5]).save(new)  # same pixels, a new file: embedded now by the imported model file
    fresh = inference.main(inference.get_args_parser().parse_args(args + ["--query_img_name", str(new)]))[0][1]
    assert fresh[0][0] == images[5] and fresh[0][2] == pytest.approx(1.0, abs=1e-5)


def test_test_script_on_original_database_recomputes_its_features(run_dir, tmp_path):
    root, data, folder, db, _ = run_dir
    out = tmp_path / "recomputed_data_base.pth"
    args = ["--data_base", f"{RUN}_data_base.pth", "--data_path", str(data), "--num_workers", "0"]
    metrics = reir_test.main(reir_test.get_args_parser().parse_args(args + ["--save_data_base", str(out)]))
    assert set(metrics) >= {"test_recall@1", "test_map@r"} and (folder / f"{RUN}_test_metrics.csv").is_file()
    split = torch.load(out, weights_only=True)["splits"]["test"]
    by_path = dict(zip(split["images"], split["features"]))
    for path, feature in zip(db["test_images"], db["test_features"]):
        assert (by_path[path] - feature.flatten()).abs().max().item() < 1e-5


def test_ablation_compares_original_databases(run_dir):
    _, _, _, db, worse_name = run_dir
    k = 2
    result = ablation.main(
        ablation.get_args_parser().parse_args(
            ["--better_data_base", f"{RUN}_data_base.pth", "--worse_data_base", worse_name, "--retrieval_num", str(k)]
        )
    )
    labels = torch.tensor(db["test_labels"])
    correct, hits = 0, 0
    for i, feature in enumerate(db["test_features"]):
        scores = _mean_cosine(feature, db["test_features"])
        scores[i] = -2
        c = int((labels[scores.topk(k).indices] == labels[i]).sum())
        correct, hits = correct + c, hits + (c > 0)
    assert result[f"better_AR@{k}"] == pytest.approx(100.0 * correct / (hits * k))


def test_sreml_model_file_without_database(run_dir, tmp_path):
    """SREML saved only epochs/<data>_<crop>_<model>_model.pth: test.py embeds with it and writes a database that
    inference.py then queries with a new image (the model found again through the database)."""
    root, data, _, _, _ = run_dir
    path = tmp_path / "cub_uncropped_resnet18_model.pth"
    torch.save(_original("resnet18", "layer1", E, M, nested=True, seed=5).state_dict(), path)
    out = root / "results" / "sreml" / "embedded_data_base.pth"  # not the run's own name: test.py refuses that
    args = ["--model_file", str(path), "--data_path", str(data), "--num_workers", "0", "--recalls", "1,2"]
    sreml_test.main(sreml_test.get_args_parser().parse_args(args + ["--save_data_base", str(out)]))
    stored = torch.load(out, weights_only=True)["splits"]["test"]["images"]
    new = tmp_path / "q.png"
    Image.open(stored[2]).save(new)
    args = ["--data_base", str(out), "--query_img_name", str(new), "--retrieval_num", "2"]
    fresh = sreml_inference.main(sreml_inference.get_args_parser().parse_args(args))[0][1]
    assert fresh[0][0] == stored[2] and fresh[0][2] == pytest.approx(1.0, abs=1e-5)


def test_mismatching_files_are_refused_in_one_line(run_dir, tmp_path):
    _, _, folder, _, _ = run_dir
    source = folder / f"{RUN}_model.pth"
    cases = {
        f"cub_uncropped_fixed_unrandom_layer1_resnet18_{E}_{M + 1}": r"shape: classifiers\.0\.weight \(4, 512\) vs "
        r"\(5, 512\)",
        f"cub_uncropped_fixed_unrandom_layer1_resnet18_{E + 1}_{M}": r"missing: classifiers\.2\.weight",
        f"cub_uncropped_fixed_unrandom_layer1_resnet34_{E}_{M}": r"missing: common_extractor\.4\.2\.conv1\.weight",
        f"cub_uncropped_fixed_unrandom_layer2_resnet18_{E}_{M}": r"unexpected: layer2\.0\.0\.conv1\.weight",
        "cub_uncropped_resnet18": r"cannot read the settings from the file name",
    }
    for run, pattern in cases.items():
        other = tmp_path / f"{run}_model.pth"
        shutil.copy(source, other)
        with pytest.raises(UserError, match=pattern) as info:
            import_reir(other)
        assert "\n" not in str(info.value)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "car_uncropped_resnet18_model.pth")
    with pytest.raises(UserError, match="no REIR/SREML weights"):
        import_sreml(tmp_path / "car_uncropped_resnet18_model.pth")
