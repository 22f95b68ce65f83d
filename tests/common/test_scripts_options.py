"""The shared scripts read their flags once into typed options: every flag lands in its field, and a caller that
builds a Namespace without some flags (fast-reid's --eval-only) gets the parser's defaults."""

import argparse

from cgd.spec import SPEC
from common.query import Postprocessing
from common.scripts import test as test_script
from common.scripts.ablation import AblationOptions, ablation_parser
from common.scripts.gallery import GalleryOptions
from common.scripts.inference import InferenceOptions, inference_parser


def test_test_flags_become_options_and_name_the_metrics_file():
    args = test_script.test_parser(SPEC).parse_args(
        ["--model-file", "m.pth", "--recalls", "1,4", "--flip", "--qe_k", "5", "--dba-k", "3", "--rerank", "--k1", "9"]
    )
    options = test_script.TestOptions.from_args(args)
    assert (options.model_file, options.recalls, options.float64) == ("m.pth", [1, 4], False)
    assert options.post == Postprocessing(flip=True, qe_k=5, dba_k=3, rerank=True, k1=9)
    assert options.post.tag() == "flip-dba3-qe5-rerank" and options.post.reranks
    plain = test_script.TestOptions.from_args(test_script.test_parser(SPEC).parse_args([]))
    assert plain.post == Postprocessing() and plain.post.tag() == "" and not plain.post.reranks


def test_a_namespace_without_postprocessing_flags_gets_the_parser_defaults():
    parser = test_script.test_parser(SPEC)
    defaults = vars(parser.parse_args([]))
    bare = argparse.Namespace(**{k: v for k, v in defaults.items() if k not in vars(Postprocessing())})
    assert test_script.TestOptions.from_args(bare).post == test_script.TestOptions.from_args(parser.parse_args([])).post


def test_inference_and_ablation_flags_become_options():
    args = inference_parser(SPEC).parse_args(
        ["--gallery", "photos", "--save-data-base", "g.pth", "--index", "ivf", "--flip", "--float64", "--add", "x"]
    )
    options = InferenceOptions.from_args(args)
    assert (options.gallery, options.add, options.index, options.post.flip) == ("photos", "x", "ivf", True)
    gallery = GalleryOptions.from_args(args)
    assert (gallery.save_data_base, gallery.flip, gallery.float64, gallery.index) == ("g.pth", True, True, "ivf")
    ablation = AblationOptions.from_args(
        ablation_parser(SPEC, "a.pth", "b.pth").parse_args(["--worse-db", "c.pth", "--save_results"])
    )
    assert ablation == AblationOptions("a.pth", "c.pth", "test", 8, True)
