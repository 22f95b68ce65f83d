"""Input-pipeline speed per core: every method's training and evaluation preset, in every pipeline mode, side by side.

Realistic fake JPEGs (CUB-like 500x375 "photos": smooth colour gradients, shapes, sensor noise; PIL quality 90) are
made on the fly in a temp folder. One process, one thread (``torch.set_num_threads(1)``): img/s **per core**, the
median over interleaved rounds (each round runs every row once, which evens out other jobs' load). Rows:

* ``original``: ``Image.open(p).convert('RGB')`` + the preset with ToTensor -> Normalize as two ops (the reference);
* ``fast``: ``open_image`` (no converted copy) + the preset as the methods run it (ToTensor/Normalize fused):
  bit-identical;
* ``tensor``: ``open_image`` + the preset on uint8 tensors (``transforms.v2`` kernels, same random draws);
* ``decode_jpeg``: ``torchvision.io.decode_jpeg`` (libjpeg-turbo) straight to a tensor + the tensor preset;
* ``tensor+draft``: ``open_image(draft=draft_size(preset))`` + the tensor preset (only differs from ``tensor``
  where the image is at least twice the preset's resize size, e.g. ``--size 1000x750``).

For each it prints the speed-up over ``original`` and the pixel difference from it (same seed, in grey levels of
0-255: max and mean |difference| over all outputs). Decoder-only rows come first.

    python -m benchmarks.loader_benchmark                          # 500x375, all methods
    python -m benchmarks.loader_benchmark --size 1000x750 --methods cgd irt --rounds 5 --json out.json

``data_loader`` and ``loader_rate`` time the same pipelines inside a real DataLoader (``benchmarks.gpu_check``);
the tensor and GPU paths are in ``benchmarks.gpu_decode``.
"""

import argparse
import importlib
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchvision import transforms as T

from benchmarks.gpu_decode import EncodedImages, GpuAugment, TensorPipeline, collate_encoded, draft_size
from benchmarks.meter import cpu_model, sync
from common.data.datasets import RetrievalDataset
from common.data.images import open_image
from common.data.normalize import split_preset

METHODS = ("cgd", "reir", "sreml", "irt", "fastretri")

MODES = ("original", "fast", "tensor", "decode_jpeg", "tensor+draft")


def method_preset(
    method: str, train: bool, data_name: str = "cub", crop_type: str = "uncropped", image_size: Optional[int] = None
) -> T.Compose:
    """``method``'s training or evaluation preset as its spec builds it (``SPEC.transform``) for a run on
    ``data_name`` at ``--image_size`` ``image_size`` (None: the method's own size); FastRetri's from the dataset's
    config file, rescaled as ``fastretri/train.py --image_size`` does."""
    config = {"data_name": data_name, "crop_type": crop_type, "image_size": image_size, "input_size": image_size}
    if method == "fastretri":
        from fastretri import config as fastretri_config

        path = fastretri_config.released_config(data_name)
        args = argparse.Namespace(config_file=str(path), opts=[], data_name=None, image_size=image_size)
        args.pretrained = None
        config = fastretri_config.flatten(fastretri_config.resolve_config(args, notes=False))
    return importlib.import_module(f"{method}.spec").SPEC.transform(config, train)


def fake_photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """A photo-like RGB image: a smooth two-colour gradient background, a few blurred filled shapes, sensor noise
    (JPEG-compresses like a photo, unlike flat synthetic images or pure noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = rng.uniform(20, 235, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * x / width + np.sin(angle) * y / height + 1) / 2.5
    img = Image.fromarray(np.clip(a + (b - a) * t[..., None], 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [
            x0,
            y0,
            x0 + int(rng.integers(width // 12, width // 2)),
            y0 + int(rng.integers(height // 12, height // 2)),
        ]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_photo(job: Tuple[str, int, int, int, int]) -> str:
    path, seed, width, height, quality = job
    fake_photo(np.random.default_rng(seed), width, height).save(path, quality=quality)
    return path


def make_jpegs(
    folder: os.PathLike,
    count: int,
    size: Tuple[int, int] = (500, 375),
    quality: int = 90,
    seed: int = 0,
    workers: int = 1,
) -> List[str]:
    """Write ``count`` fake photos as ``folder/img_00000.jpg ...`` (image i drawn with seed + i), in ``workers``
    forked processes (fork before CUDA is initialised); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"img_{i:05d}.jpg"), seed + i, *size, quality) for i in range(count)]
    if workers <= 1:
        return [_write_photo(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_write_photo, jobs, chunksize=8)


def original_open(path: str) -> Image.Image:
    """The plain decoding step (always a converted copy), for the reference rows."""
    with Image.open(path) as img:
        return img.convert("RGB")


def decode_jpeg_file(path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


def as_written(preset: Callable) -> T.Compose:
    """The preset with ToTensor -> Normalize as two torchvision ops (before the fused pass), for the reference rows."""
    ops, mean, std = split_preset(preset)
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def pipelines(preset: Callable) -> Dict[str, Callable[[str], torch.Tensor]]:
    """mode -> (path -> normalised tensor)."""
    original, tensor, draft = as_written(preset), TensorPipeline(preset), draft_size(preset)
    return {
        "original": lambda p: original(original_open(p)),
        "fast": lambda p: preset(open_image(p)),
        "tensor": lambda p: tensor(open_image(p)),
        "decode_jpeg": lambda p: tensor(decode_jpeg_file(p)),
        "tensor+draft": lambda p: tensor(open_image(p, draft=draft)),
    }


def decoders(draft: Optional[Tuple[int, int]]) -> Dict[str, Callable[[str], object]]:
    return {
        "PIL open+convert (original)": original_open,
        "PIL open_image": open_image,
        "torchvision decode_jpeg": decode_jpeg_file,
        f"PIL draft to >= {draft}": lambda p: open_image(p, draft=draft),
    }


def time_all(rows: Dict[str, Callable[[str], object]], paths: Sequence[str], rounds: int) -> Dict[str, float]:
    """Median img/s of each row over ``rounds`` interleaved passes over ``paths`` (after one warm-up image)."""
    rates: Dict[str, List[float]] = {name: [] for name in rows}
    for fn in rows.values():
        fn(paths[0])
    for _ in range(rounds):
        for name, fn in rows.items():
            torch.manual_seed(0)
            t0 = time.perf_counter()
            for p in paths:
                fn(p)
            rates[name].append(len(paths) / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def pixel_diff(
    rows: Dict[str, Callable[[str], torch.Tensor]], paths: Sequence[str], std: Sequence[float]
) -> Dict[str, Tuple[float, float]]:
    """(max, mean) |output - original output| in grey levels (x std x 255), same seed per image."""
    scale = torch.tensor(std).view(-1, 1, 1) * 255
    out = {}
    for name, fn in rows.items():
        worst, total, count = 0.0, 0.0, 0
        for i, p in enumerate(paths):
            torch.manual_seed(i)
            ref = rows["original"](p)
            torch.manual_seed(i)
            got = fn(p)
            if got.shape != ref.shape:
                worst, total, count = float("nan"), float("nan"), 1
                break
            d = ((got - ref) * scale).abs()
            worst, total, count = max(worst, d.max().item()), total + d.sum().item(), count + d.numel()
        out[name] = (worst, total / max(count, 1))
    return out


def data_loader(
    pipeline: str, preset, paths: List[str], batch: int, num_batches: int, workers: int, device: torch.device
):
    """(DataLoader, batch -> images on the device) of one input pipeline: ``original`` = the preset as written
    (PIL), ``fast`` = fused ToTensor/Normalize, ``tensor`` = decode_jpeg + tensor ops in the workers, ``gpu`` =
    the workers read bytes, decoding (nvJPEG) and augmenting happen on ``device``."""
    from torch.utils.data import DataLoader, RandomSampler

    items = [(p, str(i % 100)) for i, p in enumerate(paths)]
    labels = {str(i): i for i in range(100)}
    collate, post = None, None
    if pipeline == "original":
        dataset = RetrievalDataset(items, labels, as_written(preset))
    elif pipeline == "fast":
        dataset = RetrievalDataset(items, labels, preset)
    elif pipeline == "tensor":
        dataset = EncodedImages(RetrievalDataset(items, labels), transform=TensorPipeline(preset))
    else:
        dataset, collate = EncodedImages(RetrievalDataset(items, labels)), collate_encoded
        post = GpuAugment(preset, device)
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch * num_batches)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        collate_fn=collate,
        prefetch_factor=4 if workers > 0 else None,
    )

    def to_device(b):
        return post(b[0]) if post is not None else b[0].to(device, non_blocking=True)

    return loader, to_device


def loader_rate(loader, fn: Callable[[Any], None], warm: int, batch: int, device: torch.device) -> float:
    """img/s of fetching + ``fn`` over the batches after the first ``warm`` >= 1 (worker start-up, autotuning)."""
    t0, n = None, 0
    for i, b in enumerate(loader):
        fn(b)
        n += i >= warm
        if i == warm - 1:
            sync(device)
            t0 = time.perf_counter()
    sync(device)
    return n * batch / (time.perf_counter() - t0) if t0 is not None and n else float("nan")


def main(args: argparse.Namespace) -> Dict:
    torch.set_num_threads(1)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(tmp, args.images, size, args.quality)
        kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        print(
            f"{cpu_model()}, {os.cpu_count()} logical CPUs (load {os.getloadavg()[0]:.2f}), torch "
            f"{torch.__version__}, 1 thread; {args.images} fake JPEGs {size[0]}x{size[1]} q{args.quality} "
            f"({kb:.0f} KB avg), median of {args.rounds} interleaved rounds, img/s per core"
        )
        result: Dict = {
            "machine": cpu_model(),
            "size": list(size),
            "images": args.images,
            "rounds": args.rounds,
            "decoders": {},
            "rows": [],
        }
        dec = time_all(decoders((size[0] // 2, size[1] // 2)), paths, args.rounds)
        print("\ndecoding only")
        for name, rate in dec.items():
            print(f"  {name:34s} {rate:7.0f} img/s  {rate / dec['PIL open+convert (original)']:5.2f}x")
        result["decoders"] = dec
        print(
            f"\n{'method':10s} {'split':5s} "
            + " ".join(f"{m:>12s}" for m in MODES)
            + "   (img/s per core, speed-up vs original; max/mean |diff| in grey levels)"
        )
        for method in args.methods:
            for train in (True, False):
                preset = method_preset(method, train, args.data_name, args.crop_type)
                rows = pipelines(preset)
                rates = time_all(rows, paths, args.rounds)
                diffs = pixel_diff(rows, paths[: args.diff_images], preset.transforms[-1].std)
                split = "train" if train else "eval"
                base = rates["original"]
                print(f"{method:10s} {split:5s} " + " ".join(f"{rates[m]:12.0f}" for m in MODES))
                print(f"{'':16s} " + " ".join(f"{rates[m] / base:11.2f}x" for m in MODES))
                print(f"{'':16s} " + " ".join(f"{diffs[m][0]:5.0f}/{diffs[m][1]:6.4f}" for m in MODES))
                result["rows"].append(
                    {
                        "method": method,
                        "split": split,
                        "draft": draft_size(preset),
                        "img_per_s": rates,
                        "speedup": {m: rates[m] / base for m in MODES},
                        "max_diff": {m: diffs[m][0] for m in MODES},
                        "mean_diff": {m: diffs[m][1] for m in MODES},
                    }
                )
    result["loadavg_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="input-pipeline img/s per core, each method's presets", add_help=add_help)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--size", default="500x375", help="fake JPEG size WxH (default CUB-like 500x375)")
    p.add_argument("--quality", default=90, type=int)
    p.add_argument("--images", default=24, type=int, help="fake JPEGs per pass")
    p.add_argument("--rounds", default=3, type=int, help="interleaved passes (median)")
    p.add_argument("--diff_images", default=8, type=int, help="images compared pixel by pixel")
    p.add_argument("--data_name", default="cub", help="preset statistics / FastRetri preset of this dataset")
    p.add_argument("--crop_type", default="uncropped", choices=("uncropped", "cropped"))
    p.add_argument("--json", default=None, help="also write the results as JSON")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
