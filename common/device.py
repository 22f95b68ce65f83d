"""Device placement: ``--gpu_ids`` parsing, DataParallel, spreading ensemble learners, AMP and channels-last."""

import contextlib
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from common.errors import UserError

__all__ = [
    "parse_gpu_ids",
    "get_devices",
    "main_device",
    "data_parallel",
    "group_sizes",
    "autocast",
    "channels_last",
    "unwrap",
    "upcast",
    "first_device",
]


def parse_gpu_ids(text: Optional[str]) -> List[int]:
    """'0,1' -> [0, 1]; None -> every visible GPU; [] when CUDA is absent (then everything runs on CPU)."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text is None or str(text).strip() == "":
        return list(range(available))
    try:
        ids = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--gpu_ids must look like '0,1', got {text!r}") from None
    if available == 0:
        print(f"note: --gpu_ids {text} given but no CUDA device is available; running on CPU")
        return []
    bad = [i for i in ids if not 0 <= i < available]
    if bad:
        raise UserError(f"--gpu_ids {text}: GPU {bad[0]} does not exist ({available} visible)")
    return ids


def get_devices(gpu_ids: Sequence[int]) -> List[torch.device]:
    return [torch.device(f"cuda:{i}") for i in gpu_ids] or [torch.device("cpu")]


def main_device(gpu_ids: Sequence[int]) -> torch.device:
    return get_devices(gpu_ids)[0]


def data_parallel(model: nn.Module, gpu_ids: Sequence[int]) -> nn.Module:
    """Move to the first listed device; wrap in DataParallel when more than one GPU is listed."""
    model = model.to(main_device(gpu_ids))
    if len(gpu_ids) > 1:
        model = nn.DataParallel(model, device_ids=list(gpu_ids))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel/DistributedDataParallel (for state dicts)."""
    return model.module if hasattr(model, "module") else model


def group_sizes(num_groups: int, num_devices: int) -> List[int]:
    """How many of ``num_groups`` equal groups (ensemble learners) each of ``num_devices`` devices holds, in
    contiguous balanced blocks: 48 learners on 3 GPUs -> 16 each; 10 on 3 -> 4, 3, 3. Contiguous blocks keep each
    device's learners batchable as one grouped computation."""
    base, extra = divmod(num_groups, num_devices)
    return [base + (d < extra) for d in range(num_devices)]


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16):
    """bf16 (or fp16) autocast on CUDA when enabled; a no-op context on CPU or when disabled."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def channels_last(model: nn.Module, device: torch.device) -> nn.Module:
    """Channels-last memory format for CNNs on GPU (faster convolutions with tensor cores); unchanged on CPU."""
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision (AMP) outputs, unchanged otherwise: losses keep float64 runs exact."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def first_device(text: Optional[str]) -> List[int]:
    """``--gpu_ids`` for a method whose original used one GPU: the listed ids, or the first visible GPU."""
    ids = parse_gpu_ids(text)
    return ids if text not in (None, "") else ids[:1]


def script_device(args: Any) -> torch.device:
    """The one device of a test / inference / serve process: the first of ``--gpu_ids`` (default the first GPU),
    else the CPU."""
    return main_device(parse_gpu_ids(getattr(args, "gpu_ids", None))[:1])
