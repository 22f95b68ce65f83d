"""Command-line flags every method shares, as an argparse parent (DeiT/torchvision style).

Each method's ``get_args_parser`` starts from :func:`common_parser` and only sets its own defaults
(``parser.set_defaults(batch_size=10)``) and adds the flags its paper needs.
"""

import argparse
import math
import re
from typing import Any, Callable, List, Optional, Sequence, Union

from common.errors import UserError

__all__ = [
    "DATASETS",
    "dataset_name",
    "common_parser",
    "parse_recalls",
    "validate_args",
    "bool_pair",
    "add_check_flags",
    "add_speed_flags",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "check_value",
]

DATASETS = ("car", "cub", "sop", "isc", "demo")  # the benchmarks; any dataset processed by data_utils.py also works
CROPPABLE = ("car", "cub", "demo")
_DATA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def dataset_name(text: str) -> str:
    """A benchmark name or a plain folder name; whether ``<data_path>/<name>/`` holds an index is checked when the
    data is loaded (common.preprocess.ensure_dataset), where --data_path is known."""
    if text not in DATASETS and not _DATA_NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dataset name: {', '.join(DATASETS)} or a dataset "
            f"processed by data_utils.py (letters, digits, '_', '-', '.')"
        )
    return text


def _number(kind: type, minimum: Union[int, float], strict: bool) -> Callable[[Any], Any]:
    """An argparse ``type``: ``kind`` of the text, finite, and > ``minimum`` (``strict``) or >= it."""
    words = {int: "an integer", float: "a number"}[kind]
    bound = f"{'greater than' if strict else 'at least'} {minimum:g}"

    def parse(text: Any) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {words} {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {words} {bound}, got {text!r}")
        return value

    parse.__name__ = f"{'positive' if strict else 'non_negative'}_{kind.__name__}"
    return parse


positive_int = _number(int, 0, strict=True)  # --batch_size, --feature_dim, --image_size
non_negative_int = _number(int, 0, strict=False)  # --num_workers, --num_epochs (0 = evaluate only)
positive_float = _number(float, 0.0, strict=True)  # temperatures, scales
non_negative_float = _number(float, 0.0, strict=False)  # --lr, margins, weights


def check_value(name: str, value: Any, parse: Callable[[Any], Any]) -> Any:
    """``parse(value)`` for a value that did not come through argparse (a config file's, an override's): one
    ``error:`` line naming ``name`` instead of argparse's message."""
    try:
        return parse(value)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"{name}: {e}") from None


def parse_recalls(text: str) -> List[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]; an argparse ``type`` so bad input is a one-line argument error."""
    try:
        ks = [int(k) for k in str(text).split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"recalls must be comma-separated integers, got {text!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"recalls must be positive integers, got {text!r}")
    return ks


def bool_pair(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """Add ``--name`` / ``--no-name`` switching one boolean both ways."""
    dest = name.replace("-", "_")
    parser.add_argument(f"--{name}", dest=dest, action="store_true", help=f"{help} (default: {default})")
    parser.add_argument(f"--no-{name}", dest=dest, action="store_false", help=argparse.SUPPRESS)
    parser.set_defaults(**{dest: default})


def common_parser(
    data_name: str = "car", batch_size: int = 128, num_epochs: int = 20, recalls: str = "1,2,4,8"
) -> argparse.ArgumentParser:
    """Parent parser with the flags shared by all methods; defaults mirror the originals per method."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default="data", type=str, help="root holding <data_name>/ folders (default: data)")
    g.add_argument(
        "--data_name",
        default=data_name,
        type=dataset_name,
        metavar="NAME",
        help=f"dataset: {' '.join(DATASETS)}, or your own processed by data_utils.py --from_folder / "
        f"--from_csv into <data_path>/NAME/ (default: {data_name})",
    )
    g.add_argument(
        "--crop_type",
        default="uncropped",
        choices=["uncropped", "cropped"],
        help="bounding-box cropped images: car, cub, demo, or own data from a CSV with boxes (default: uncropped)",
    )
    g.add_argument(
        "--image_size",
        default=None,
        type=positive_int,
        help="scale the method's transform preset to this crop size (default: the paper's size)",
    )
    g.add_argument("--num_workers", default=4, type=non_negative_int, help="DataLoader workers (default: 4)")
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", default=batch_size, type=positive_int, help=f"batch size (default: {batch_size})")
    g.add_argument(
        "--num_epochs",
        default=num_epochs,
        type=non_negative_int,
        help=f"epochs; 0 = evaluate only (default: {num_epochs})",
    )
    g.add_argument("--seed", default=0, type=int, help="seed for python, numpy and torch (default: 0)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue an interrupted run: this run's last checkpoint, or a given checkpoint path",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained",
        default="imagenet",
        help="backbone weights: imagenet (torchvision cache/download), none, or a state-dict PATH",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--recalls",
        default=parse_recalls(recalls),
        type=parse_recalls,
        help=f"ranks K for Recall@K, comma separated (default: {recalls})",
    )
    g = p.add_argument_group("device")
    g.add_argument(
        "--gpu_ids",
        default=None,
        type=str,
        help="GPUs of a single process, e.g. '0,1' (default: the first visible; CPU if none); under "
        "torchrun each process takes GPU LOCAL_RANK",
    )
    add_speed_flags(g)
    add_check_flags(p)
    return p


def add_speed_flags(group) -> None:
    """``--amp``, ``--amp_dtype``, ``--compile`` (common.device.Precision, maybe_compile), on CPU as on CUDA; autocast
    applies to training steps only, evaluation features stay float32."""
    bool_pair(group, "amp", False, "mixed precision: the training forward under autocast to --amp_dtype")
    group.add_argument(
        "--amp_dtype",
        default="bfloat16",
        choices=["bfloat16", "float16"],
        help="autocast dtype of --amp; float16 adds a gradient scaler (default: bfloat16)",
    )
    bool_pair(group, "compile", False, "torch.compile the model (the first steps pay the compilation)")


def add_check_flags(parser: argparse.ArgumentParser) -> None:
    """Switches for equivalence checks (N processes vs 1): float64 and no random augmentation."""
    g = parser.add_argument_group("equivalence checks")
    bool_pair(g, "float64", False, "train and evaluate in float64 (slow; makes N-process vs 1-process runs comparable)")
    bool_pair(g, "augment", True, "random training augmentation; --no-augment trains on the evaluation transform")


def validate_args(args: argparse.Namespace, gallery_size: Optional[int] = None, self_excluded: bool = True) -> None:
    """Reject bad combinations with one line instead of an assertion deep inside training."""
    if (
        getattr(args, "crop_type", "uncropped") == "cropped"
        and args.data_name in DATASETS
        and args.data_name not in CROPPABLE
    ):  # own data: cropped exists iff its CSV had boxes (ensure_dataset)
        raise UserError(
            f"--crop_type cropped needs bounding boxes: only {', '.join(CROPPABLE)} have them, not {args.data_name}"
        )
    for name in ("batch_size", "num_epochs"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "num_epochs" else 1):
            raise UserError(f"--{name} must be positive, got {value}")
    if gallery_size is not None:
        limit = gallery_size - (1 if self_excluded else 0)
        too_big: Sequence[int] = [k for k in args.recalls if k > limit]
        if too_big:
            raise UserError(f"--recalls {max(too_big)} is larger than the gallery ({limit} images to rank)")
