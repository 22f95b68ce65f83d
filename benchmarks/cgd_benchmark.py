"""CGD throughput: training steps (forward + both losses + backward + Adam) and embedding (inference) in images/s.

CPU: small inputs so it finishes in a minute (resnet18 at 64 px, resnet50 at 112 px). With a GPU it also measures
resnet50 at 224 px in fp32 and with bf16 autocast (``--amp``), channels-last, as ``cgd/train.py`` runs it.
Synthetic images; 4 images per class as the m-per-class sampler gives.

    python benchmarks/cgd_benchmark.py                 # CPU rows, plus GPU rows when CUDA is available
    python benchmarks/cgd_benchmark.py --steps 20 --batch_size 128
"""

import argparse
import json
import platform
import time
from typing import Dict, List

import torch

from cgd.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropyLoss
from cgd.model import Model
from common.device import autocast, channels_last


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    backbone: str, image_size: int, batch_size: int, steps: int, device: torch.device, amp: bool
) -> Dict[str, float]:
    """Images/s of training steps and of no-grad embedding, after one warm-up step each."""
    torch.manual_seed(0)
    model = channels_last(Model(backbone, "SG", 1536, 100).to(device), device)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch_size, device=device) // 4
    ce, triplet = LabelSmoothingCrossEntropyLoss(), BatchHardTripletLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step():
        with autocast(device, amp):
            embeddings, logits = model(images)
        loss = ce(logits.float(), labels) + triplet(embeddings.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def embed_step():
        with torch.inference_mode(), autocast(device, amp):
            model(images)

    out = {}
    for name, step, mode in (("train", train_step, model.train), ("embed", embed_step, model.eval)):
        mode()
        step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        out[f"{name}_img_s"] = round(batch_size * steps / (time.perf_counter() - t0), 1)
    return out


def main(args: argparse.Namespace) -> List[Dict]:
    cases = [("cpu", "resnet18", 64, False), ("cpu", "resnet50", 112, False)]
    if torch.cuda.is_available() and not args.cpu_only:
        cases += [("cuda", "resnet50", 224, False), ("cuda", "resnet50", 224, True)]
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    rows = []
    for device, backbone, size, amp in cases:
        batch = args.batch_size if device == "cuda" else args.cpu_batch_size
        row = {
            "device": device,
            "backbone": backbone,
            "image_size": size,
            "batch_size": batch,
            "amp": amp,
            **measure(backbone, size, batch, args.steps, torch.device(device), amp),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="CGD training / embedding throughput", add_help=add_help)
    parser.add_argument("--steps", default=5, type=int, help="timed steps per measurement (default: 5)")
    parser.add_argument("--cpu_batch_size", default=16, type=int, help="batch size on CPU (default: 16)")
    parser.add_argument("--batch_size", default=128, type=int, help="batch size on GPU (default: 128)")
    parser.add_argument("--cpu_only", action="store_true", help="skip the GPU rows")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
