"""IRT speed: training iterations/s (forward, contrastive + XBM + KoLeo, backward, AdamW step) and embedding images/s.

Synthetic tensors, so the figures measure the model and the loss, not JPEG decoding. Defaults: on a GPU the paper's
setting (DeiT-S distilled at 224 px, batch 64, a CUB-sized memory of 5,864 entries); on CPU a small ViT at 48 px.

    python benchmarks/irt_benchmark.py                       # auto: GPU setting if CUDA is available
    python benchmarks/irt_benchmark.py --device cuda --amp   # bf16 autocast
"""

import argparse
import platform
import time

import torch

from common.device import autocast
from irt.losses import ContrastiveLoss, KoLeo
from irt.model import build_model, parse_model_kwargs
from irt.train import build_optimizer
from irt.train import get_args_parser as train_parser
from irt.xbm import XBM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_speed(model, device, batch_size, input_size, memory, iters, warmup, amp) -> float:
    """Optimizer steps per second with the full IRT_R loss against a memory of ``memory`` entries."""
    args = train_parser().parse_args([])
    optimizer = build_optimizer(model, args)
    criterion, koleo = ContrastiveLoss(0.5), KoLeo()
    xbm = XBM(memory, model.embed_dim).to(device)
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    y = torch.arange(batch_size, device=device) // 2
    model.train()
    for step in range(warmup + iters):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast(device, amp):
            z = model(x)
        slots = xbm.enqueue(z.detach(), y)
        feats, labels = xbm.get()
        loss = criterion(z, y) + criterion(z, y, feats, labels, xbm.self_pairs(slots)) + 0.7 * koleo(z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return iters / (time.perf_counter() - start)


@torch.inference_mode()
def embed_speed(model, device, batch_size, input_size, iters, warmup, amp) -> float:
    model.eval()
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    for step in range(warmup + iters):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast(device, amp):
            model(x)
    _sync(device)
    return iters * batch_size / (time.perf_counter() - start)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


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
    model = build_model(name, "none", size, drop_path=0.1, model_kwargs=kwargs).to(device)
    it_s = train_speed(model, device, batch, size, args.memory, args.iters, args.warmup, args.amp)
    img_s = embed_speed(model, device, args.embed_batch_size or 2 * batch, size, args.iters, args.warmup, args.amp)
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
    main(get_args_parser().parse_args())
