"""The datasets this toolkit knows by name: one record per benchmark (and the synthetic demo).

Every list of dataset names in the toolkit derives from :data:`BENCHMARKS`: the command-line choices, which
datasets have bounding boxes, the splits an index holds, the evaluation protocol, and the originals' spellings
(fast-reid's ``Cars196``, IRT's ``cub200``). Any other plain name is the user's own data, indexed by
``data_utils.py --from_csv / --from_folder`` under ``<data_path>/<name>/``.
"""

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = [
    "Benchmark",
    "BENCHMARKS",
    "DATASET_NAMES",
    "REAL_DATASETS",
    "CROPPABLE",
    "ALIASES",
    "OWN_NAME",
    "benchmark_name",
]

_CUB_FILES = ("images.txt", "image_class_labels.txt", "bounding_boxes.txt")


@dataclass(frozen=True)
class Benchmark:
    """One known dataset. ``annotations`` are the raw files its index is built from (an index older than any of
    them is rebuilt); ``expected`` says what its folder should hold, for messages; ``aliases`` are the originals'
    names for it (lower case)."""

    name: str
    crop_types: Tuple[str, ...]
    splits: Tuple[str, ...]
    eval_splits: Tuple[str, str]
    annotations: Tuple[str, ...]
    expected: str
    aliases: Tuple[str, ...] = ()
    synthetic: bool = False


_TEST = ("test", "test")  # rank the test split against itself (self excluded)
BENCHMARKS: Dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "car",
            ("uncropped", "cropped"),
            ("train", "test"),
            _TEST,
            ("cars_annos.mat",),
            "cars_annos.mat and car_ims/ (the Stanford Cars DML download)",
            ("cars196", "cars"),
        ),
        Benchmark(
            "cub",
            ("uncropped", "cropped"),
            ("train", "test"),
            _TEST,
            _CUB_FILES,
            "the contents of CUB_200_2011/: images.txt, image_class_labels.txt, bounding_boxes.txt, images/",
            ("cub200",),
        ),
        Benchmark(
            "sop",
            ("uncropped",),
            ("train", "test"),
            _TEST,
            ("Ebay_train.txt", "Ebay_test.txt"),
            "the contents of Stanford_Online_Products/: Ebay_train.txt, Ebay_test.txt, <category>_final/",
        ),
        Benchmark(
            "isc",
            ("uncropped",),
            ("train", "query", "gallery"),
            ("query", "gallery"),
            ("Eval/list_eval_partition.txt",),
            "Eval/list_eval_partition.txt and Img/img/ (In-shop Clothes Retrieval Benchmark)",
            ("inshop",),
        ),
        Benchmark(
            "demo",
            ("uncropped", "cropped"),
            ("train", "test"),
            _TEST,
            _CUB_FILES,
            "images.txt, image_class_labels.txt, bounding_boxes.txt, images/ (regenerate with --data_name demo)",
            synthetic=True,
        ),
    )
}
DATASET_NAMES: Tuple[str, ...] = tuple(BENCHMARKS)
REAL_DATASETS: Tuple[str, ...] = tuple(n for n, b in BENCHMARKS.items() if not b.synthetic)
CROPPABLE: Tuple[str, ...] = tuple(n for n, b in BENCHMARKS.items() if "cropped" in b.crop_types)
# this toolkit's names and the originals' (lower case) -> this toolkit's name
ALIASES: Dict[str, str] = {alias: b.name for b in BENCHMARKS.values() for alias in (b.name, *b.aliases)}
# an own dataset's name names the folder <data_path>/<name> and prefixes run names: keep it plain
OWN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def benchmark_name(name: str) -> Optional[str]:
    """This toolkit's name of a benchmark given in any spelling the originals use (case-insensitive), else None."""
    return ALIASES.get(name.lower())
