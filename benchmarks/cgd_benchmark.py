"""CGD throughput: training steps (forward + both losses + backward + Adam) and embedding (inference) in images/s.

CPU: small inputs so it finishes in a minute (resnet18 at 64 px, resnet50 at 112 px). With a GPU it also measures
resnet50 at 224 px in fp32 and with bf16 autocast, channels-last, as ``cgd/train.py`` runs it.
Synthetic images; 4 images per class as the m-per-class sampler gives.

    python -m benchmarks.cgd_benchmark                 # CPU rows, plus GPU rows when CUDA is available
    python -m benchmarks.cgd_benchmark --steps 20 --batch_size 128
"""

import argparse
import json
import platform
from typing import Dict, List

import torch

from benchmarks.meter import Trainer, TrainingParts, autocast, timed
from cgd.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropyLoss
from cgd.model import Model


def training_parts(backbone: str, batch_size: int) -> TrainingParts:
    """CGD's SG-1536 model over 100 classes, label-smoothed cross-entropy + batch-hard triplet, Adam; 4 images of
    each class per batch, as the m-per-class sampler gives."""
    model = Model(backbone, "SG", 1536, 100)
    ce, triplet = LabelSmoothingCrossEntropyLoss(), BatchHardTripletLoss()

    def loss(out, labels: torch.Tensor) -> torch.Tensor:
        embeddings, logits = out
        return ce(logits.float(), labels) + triplet(embeddings.float(), labels)

    labels = torch.arange(batch_size) // 4 % 100
    return TrainingParts(model, loss, lambda params: torch.optim.Adam(params, lr=1e-4), labels)


def measure(
    backbone: str, image_size: int, batch_size: int, steps: int, device: torch.device, amp: bool
) -> Dict[str, float]:
    """Images/s of training steps and of no-grad embedding, after one warm-up step each."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if amp and device.type == "cuda" else None
    trainer = Trainer(training_parts(backbone, batch_size), device, dtype, channels_last=device.type == "cuda")
    model, images = trainer.model, trainer.prepare(torch.randn(batch_size, 3, image_size, image_size))

    def embed_step():
        with torch.inference_mode(), autocast(device, dtype):
            model(images)

    out = {}
    for name, step, mode in (("train", lambda: trainer.step(images), model.train), ("embed", embed_step, model.eval)):
        mode()
        out[f"{name}_img_s"] = round(batch_size / timed(step, 1, steps, device), 1)
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
