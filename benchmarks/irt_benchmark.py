"""IRT speed: training iterations/s (forward, contrastive + XBM + KoLeo, backward, AdamW step) and embedding images/s.

Synthetic tensors, so the figures measure the model and the loss, not JPEG decoding. Defaults: on a GPU the paper's
setting (DeiT-S distilled at 224 px, batch 64, a CUB-sized memory of 5,864 entries); on CPU a small ViT at 48 px.

    python -m benchmarks.irt_benchmark                       # auto: GPU setting if CUDA is available
    python -m benchmarks.irt_benchmark --device cuda --amp   # bf16 autocast
"""

import argparse
from typing import Dict

import torch
from torch import nn

from benchmarks.meter import Trainer, TrainingParts, autocast, cpu_model, timed
from common.errors import run_cli
from irt.losses import ContrastiveLoss, KoLeo
from irt.model import build_model, parse_model_kwargs
from irt.xbm import XBM


class IRTLoss(nn.Module):
    """IRT_R's loss as irt/train.py computes it without a momentum encoder: contrastive (margin 0.5) + 0.7 KoLeo
    on fp32 embeddings, plus the contrastive term against an XBM memory of ``memory`` entries (0: none); every
    call is one iteration of new samples."""

    def __init__(self, memory: int, embed_dim: int):
        super().__init__()
        self.contrastive, self.koleo = ContrastiveLoss(0.5), KoLeo()
        self.xbm = XBM(memory, embed_dim) if memory else None

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = z.float()
        loss = self.contrastive(z, labels) + 0.7 * self.koleo(z)
        if self.xbm is not None:
            slots = self.xbm.enqueue(z.detach(), labels)
            feats, mem_labels = self.xbm.get()
            loss = loss + self.contrastive(z, labels, feats, mem_labels, self.xbm.self_pairs(slots))
        return loss


def training_parts(name: str, model_kwargs: Dict, input_size: int, batch_size: int, memory: int = 0) -> TrainingParts:
    """IRT's model (a timm ViT without classifier, drop-path 0.1), ``IRTLoss``, and AdamW at irt/train.py's
    defaults (lr 3e-5, weight decay 5e-4 on every parameter: the grouping does not change a step's time); 2 images
    of each class per batch (``--m 2``)."""
    model = build_model(name, "none", input_size, drop_path=0.1, model_kwargs=model_kwargs)
    labels = torch.arange(batch_size) // 2
    return TrainingParts(
        model,
        IRTLoss(memory, model.embed_dim),
        lambda params: torch.optim.AdamW(params, lr=3e-5, weight_decay=5e-4),
        labels,
    )


def train_speed(parts: TrainingParts, device: torch.device, input_size: int, iters: int, warmup: int, amp: bool):
    """Optimizer steps per second of ``parts`` on synthetic images (bf16 autocast with ``amp`` on CUDA)."""
    trainer = Trainer(parts, device, torch.bfloat16 if amp and device.type == "cuda" else None)
    x = torch.randn(len(parts.labels), 3, input_size, input_size, device=device)
    return 1 / timed(lambda: trainer.step(x), warmup, iters, device)


@torch.inference_mode()
def embed_speed(model: nn.Module, device: torch.device, batch_size, input_size, iters, warmup, amp) -> float:
    model.eval()
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    dtype = torch.bfloat16 if amp and device.type == "cuda" else None

    def step():
        with autocast(device, dtype):
            model(x)

    return batch_size / timed(step, warmup, iters, device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    name = args.model or ("deit_small_distilled_patch16_224" if gpu else "vit_tiny_patch16_224")
    size = args.input_size or (224 if gpu else 48)
    kwargs = parse_model_kwargs(
        args.model_kwargs if args.model_kwargs is not None else ([] if gpu else ["patch_size=8", "depth=4"])
    )
    batch = args.batch_size or (64 if gpu else 32)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parts = training_parts(name, kwargs, size, batch, args.memory)
    it_s = train_speed(parts, device, size, args.iters, args.warmup, args.amp)
    img_s = embed_speed(
        parts.model, device, args.embed_batch_size or 2 * batch, size, args.iters, args.warmup, args.amp
    )
    kw = " ".join(f"{k}={v}" for k, v in kwargs.items())
    print(
        f"| {name} {kw} | {size} px | batch {batch} | XBM {args.memory} | {it_s:.2f} it/s "
        f"({it_s * batch:.0f} img/s) | embedding {img_s:.0f} img/s | {machine(device)}"
        f"{' | bf16 autocast' if args.amp and gpu else ''} |"
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("IRT speed benchmark", add_help=add_help)
    p.add_argument(
        "--model",
        default=None,
        help="timm ViT (default: deit_small_distilled_patch16_224 on GPU, "
        "vit_tiny_patch16_224 patch_size=8 depth=4 on CPU)",
    )
    p.add_argument("--input-size", default=None, type=int, help="px (default: 224 GPU, 48 CPU)")
    p.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE", help="timm kwargs")
    p.add_argument("--batch-size", default=None, type=int, help="training batch (default: 64 GPU, 32 CPU)")
    p.add_argument("--embed-batch-size", default=None, type=int, help="embedding batch (default: 2 x batch)")
    p.add_argument("--memory", default=5864, type=int, help="XBM entries (default: 5864 = CUB train set)")
    p.add_argument("--iters", default=10, type=int, help="timed iterations (default: 10)")
    p.add_argument("--warmup", default=2, type=int, help="untimed iterations first (default: 2)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--threads", default=None, type=int, help="CPU threads (default: torch's)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
