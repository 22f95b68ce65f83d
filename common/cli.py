"""Command-line flags every method shares, as an argparse parent (DeiT/torchvision style).

Each method's ``get_args_parser`` starts from :func:`common_parser` and only sets its own defaults
(``parser.set_defaults(batch_size=10)``) and adds the flags its paper needs.
"""

import argparse
import difflib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Union

import yaml

from common.data.registry import CROPPABLE
from common.data.registry import DATASET_NAMES as DATASETS
from common.data.registry import OWN_NAME as _DATA_NAME
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
    "available_cores",
    "default_workers",
    "add_config_flag",
    "read_config",
    "given_dests",
    "apply_demo_defaults",
    "parse_args_with_config",
    "write_args_yaml",
    "run_summary",
    "add_model_selection",
    "add_flag",
    "add_embedding_flags",
    "script",
]


def dataset_name(text: str) -> str:
    """A benchmark name or a plain folder name; whether ``<data_path>/<name>/`` holds an index is checked when the
    data is loaded (common.data.prepare.ensure_dataset), where --data_path is known."""
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


def add_model_selection(group, default: str, original: str, ranks_flag: str) -> None:
    """``--model_selection best|last``: which epoch's model and database a run keeps (every method's flag).

    ``original`` says what the method's original kept; ``ranks_flag`` names the flag whose first rank "best" uses."""
    group.add_argument(
        "--model_selection",
        "--model-selection",
        default=default,
        choices=["best", "last"],
        help=f"model and database kept: the best epoch on the first {ranks_flag} rank, or the last epoch "
        f"({original}; default: {default})",
    )


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
    workers = default_workers(4)
    g.add_argument(
        "--num_workers",
        default=workers,
        type=non_negative_int,
        help=f"DataLoader workers (default: min(4, cores available) = {workers})",
    )
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
        help="backbone weights: imagenet (torchvision's for a ResNet, timm's for timm:NAME; from the local cache, "
        "downloaded where online), none, or a PATH to a state-dict .pth or .safetensors file",
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


# ---- machine-fitting defaults ------------------------------------------------------------------------------------


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. under taskset or a
    container's cpuset), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(cap: int) -> int:
    """DataLoader workers by default: the method's own number, but never more than the cores (more only add
    start-up time and a PyTorch warning on a small machine)."""
    return min(cap, available_cores())


# ---- config files ------------------------------------------------------------------------------------------------

CONFIG_HELP = (
    "YAML file of flag values, keys = flag names (batch_size: 32, lr: 1.0e-3, no dashes); flags given on the "
    "command line win; a run's <run>_args.yaml repeats it"
)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """``-c/--config FILE.yaml`` (timm's spelling); read by :func:`parse_args_with_config`."""
    parser.add_argument("-c", "--config", default=None, metavar="FILE.yaml", help=CONFIG_HELP)


def _settable(parser: argparse.ArgumentParser) -> Dict[str, List[argparse.Action]]:
    """Every name a config key may use (dests and long flags, '-' read as '_') -> the actions behind it."""
    names: Dict[str, List[argparse.Action]] = {}
    for action in parser._actions:  # argparse offers no public list of its actions
        if action.dest in (argparse.SUPPRESS, "help", "config"):
            continue
        keys = {action.dest}
        if action.nargs != 0:  # a switch goes by its dest only: `freeze_bn: false`, never `no_freeze_bn: true`
            keys |= {s.lstrip("-").replace("-", "_") for s in action.option_strings if s.startswith("--")}
        for key in keys:
            names.setdefault(key, []).append(action)
    return names


def _convert(action: argparse.Action, value: Any) -> Any:
    """``value`` as the command line would give it for ``action`` (its type and choices applied), else raise."""
    if action.nargs == 0:  # store_true / store_false (bool_pair)
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
        return value
    convert = action.type or (lambda text: text)
    if action.nargs in ("*", "+", argparse.REMAINDER) or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise argparse.ArgumentTypeError("expected at least one value")
        out = [convert(str(x)) for x in items]
        bad = [x for x in out if action.choices is not None and x not in action.choices]
    else:  # one value; a list stands for the comma-separated form (recalls: [1, 2, 4, 8])
        text = ",".join(str(x) for x in value) if isinstance(value, list) else str(value)
        out = convert(text)
        bad = [out] if action.choices is not None and out not in action.choices else []
    if bad:
        raise argparse.ArgumentTypeError(
            f"invalid choice {bad[0]!r} (choose from {', '.join(map(str, action.choices or ()))})"
        )
    return out


def _config_value(parser: argparse.ArgumentParser, actions: List[argparse.Action], value: Any) -> Any:
    if value is None:
        if parser.get_default(actions[0].dest) is not None:
            raise argparse.ArgumentTypeError("null is allowed only for flags whose default is none")
        return None
    first: Optional[Exception] = None
    for action in actions:  # --rank (a list) and --recalls ('1,2') share a dest: the first that takes the value
        try:
            return _convert(action, value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            first = first or e
    raise argparse.ArgumentTypeError(str(first))


def read_config(parser: argparse.ArgumentParser, path: Union[str, Path]) -> Dict[str, Any]:
    """``{dest: value}`` of a YAML config file, each value checked as its flag would be; an unknown key, a bad
    value or an unreadable file is a :class:`UserError`. Keys fixed by the script (``set_defaults`` without a
    flag, such as SREML's ``label_type``) are accepted only with their fixed value, so a run's ``args.yaml`` reads
    back."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of flag names to values")
    names, out = _settable(parser), {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in names:
            try:
                out[names[name][0].dest] = _config_value(parser, names[name], value)
            except argparse.ArgumentTypeError as e:
                raise UserError(f"--config {path}: {key}: {e}") from None
        elif name != "config" and parser.get_default(name) is not None:
            if value != parser.get_default(name):
                raise UserError(f"--config {path}: {key} is fixed to {parser.get_default(name)!r} by this script")
        elif name != "config":
            close = difflib.get_close_matches(name, list(names), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"--config {path}: unknown key {key!r}{hint}; keys are this script's flag names")
    return out


_UNSET = object()


def _set_by(parser: argparse.ArgumentParser, argv: Sequence[str], dests: Iterable[str]) -> Dict[str, Any]:
    """``{dest: value}`` of the ``dests`` that ``argv`` sets: argparse leaves an attribute already on the namespace
    alone unless a flag sets it, so a namespace pre-filled with a marker shows which flags were given."""
    namespace = argparse.Namespace(**{d: _UNSET for d in dests})
    parser.parse_args(list(argv), namespace=namespace)
    return {d: v for d, v in vars(namespace).items() if v is not _UNSET}


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str], dests: Iterable[str]) -> Set[str]:
    """The ``dests`` that flags in ``argv`` set (rather than their defaults)."""
    return set(_set_by(parser, argv, dests))


def _groups(tokens: Sequence[str]) -> List[List[str]]:
    """``['--lr', '1e-3', '--no-freeze_bn']`` -> ``[['--lr', '1e-3'], ['--no-freeze_bn']]``."""
    groups: List[List[str]] = []
    for token in tokens:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def apply_demo_defaults(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    settings: Sequence[str],
    given: Iterable[str] = (),
) -> List[str]:
    """Set each flag of ``settings`` (command-line text) that neither ``argv`` nor ``given`` (a config file's
    keys) set; print and return the flags applied."""
    dests = list(vars(args))
    taken = given_dests(parser, argv, dests) | set(given)
    applied: List[str] = []
    for group in _groups(settings):
        values = _set_by(parser, group, dests)
        if not set(values) & taken:
            for dest, value in values.items():
                setattr(args, dest, value)
            applied += group
    if applied and os.environ.get("RANK", "0") == "0":
        print(f"demo settings: {' '.join(applied)}", flush=True)
    return applied


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, demo: Optional[Sequence[str]] = None
) -> argparse.Namespace:
    """``parser.parse_args`` with ``--config FILE.yaml`` values as defaults (the command line wins) and, when the
    dataset is the demo, ``demo``'s flags for those neither gave. A bad config is one ``error:`` line, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    from_config: Dict[str, Any] = {}
    try:
        if getattr(args, "config", None):
            from_config = read_config(parser, args.config)
            parser.set_defaults(**from_config)
            args = parser.parse_args(argv)
        if demo and getattr(args, "data_name", None) == "demo":
            apply_demo_defaults(args, parser, argv, demo, given=from_config)
    except UserError as e:
        parser.exit(2, f"error: {e}\n")
    return args


def write_args_yaml(args: argparse.Namespace, path: Union[str, Path], script: Optional[str] = None) -> Path:
    """The run's resolved arguments as YAML (atomically), so ``--config <path>`` repeats the run; ``--resume`` is
    left out (a repeat starts afresh; add ``--resume`` to continue)."""
    from common.runio import atomic_write, plain_config  # lazily: parsing needs no torch

    values = {k: v for k, v in plain_config(args).items() if k not in ("config", "resume")}
    head = f"# resolved arguments; repeat the run with: python {script or sys.argv[0]} --config {path}\n"
    text = head + yaml.safe_dump(values, sort_keys=True, default_flow_style=None)
    atomic_write(path, lambda f: f.write(text.encode()))
    return Path(path)


def run_summary(run: Any, where: Optional[Callable[[int], str]] = None) -> str:
    """The line a training run ends with: the first requested Recall@K untrained and of the kept model (the best
    or the last trained evaluation, as ``run.selection`` says), the time taken and where the files are; ``where``
    names a row (default ``epoch N``)."""
    key, rows = run.key_metric, run.stats.rows
    scored = [(epoch, row[key]) for epoch, row in sorted(rows.items()) if key in row]
    trained = [(e, v) for e, v in scored if e > 0] or scored
    label = key.replace("test_recall@", "R@")
    text = f"{label}: no evaluation"
    if trained:
        epoch, value = max(trained, key=lambda ev: ev[1]) if run.selection == "best" else trained[-1]
        before = f"{rows[0][key]:.2f}% untrained -> " if key in rows.get(0, {}) else ""
        text = f"{label} {before}{value:.2f}% kept ({where(epoch) if where else f'epoch {epoch}'})"
    files = Path(run.files.directory) / f"{run.files.name}_*"
    return f"{text}; {time.time() - run.started:.0f} s; results: {files}"


# ---------------------------------------------------------------- the shared scripts' flags and bindings

__all__ += ["add_flag", "script"]


def add_flag(group, name: str, **kwargs) -> None:
    """``--name_with_underscores`` with the hyphenated spelling as an alias (IRT's and fast-reid's style)."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    group.add_argument(*names, dest=name, **kwargs)


def add_embedding_flags(group, purpose: str = "") -> None:
    """``--batch_size`` (64) and ``--num_workers`` (at most 4, at most the cores) of a script that embeds images;
    ``purpose`` ends each help line (e.g. " for --gallery")."""
    add_flag(group, "batch_size", default=64, type=positive_int, help=f"images per forward pass{purpose} (default: 64)")
    workers = default_workers(4)
    help_workers = f"DataLoader workers{purpose} (default: min(4, cores) = {workers})"
    add_flag(group, "num_workers", default=workers, type=non_negative_int, help=help_workers)


def script(
    parser: Callable[..., argparse.ArgumentParser],
    body: Callable[[Any, argparse.Namespace], Any],
    spec: Any,
    *parser_args: Any,
) -> tuple:
    """``(get_args_parser, main)`` of a method's thin script: a shared parser and body bound to its
    :class:`common.spec.MethodSpec`."""

    def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
        return parser(spec, *parser_args, add_help=add_help)

    def main(args: argparse.Namespace) -> Any:
        return body(spec, args)

    return get_args_parser, main
