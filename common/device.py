"""Device placement: ``--gpu_ids`` parsing, DataParallel, spreading ensemble learners; how a training step computes
(:class:`Precision`: autocast, GradScaler, channels-last) and :func:`maybe_compile`, the same on CPU and GPU."""

import contextlib
import shutil
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.errors import UserError

__all__ = [
    "parse_gpu_ids",
    "get_devices",
    "main_device",
    "data_parallel",
    "group_sizes",
    "AMP_DTYPES",
    "autocast",
    "channels_last",
    "native_low_precision",
    "Precision",
    "maybe_compile",
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


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # --amp_dtype / SOLVER.AMP.DTYPE
COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests swap in "eager" (no minutes of code generation)


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16):
    """Autocast to ``dtype`` on ``device`` (CUDA or CPU) when enabled; a no-op context otherwise.

    On CPU, attention (``F.scaled_dot_product_attention``, timm's ViTs) also takes the math backend under autocast:
    the fused CPU flash-attention kernel's backward in bfloat16 is several times slower than its float32 one at ViT
    token counts (docs/benchmarks.md), while the math form runs its matrix products in bfloat16 as well, at the same
    accuracy. Float32 (autocast off) keeps PyTorch's choice."""
    if not enabled:
        return contextlib.nullcontext()
    if torch.device(device).type != "cpu":
        return torch.autocast(torch.device(device).type, dtype=dtype)
    return _cpu_autocast(dtype)


@contextlib.contextmanager
def _cpu_autocast(dtype: torch.dtype):
    with torch.autocast("cpu", dtype=dtype), sdpa_kernel([SDPBackend.MATH]):
        yield


def channels_last(model: nn.Module, device: torch.device) -> nn.Module:
    """Channels-last memory format for CNNs on GPU (faster convolutions with tensor cores); unchanged on CPU."""
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def native_low_precision(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` matrix products in hardware (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16 or
    AVX512-FP16); elsewhere oneDNN emulates them, slower than float32."""
    cpu = getattr(torch, "cpu", None)
    if dtype == torch.bfloat16:
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    else:
        probes = ("_is_amx_fp16_supported", "_is_avx512_fp16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


@dataclass
class Precision:
    """How a training step computes: autocast to ``dtype`` (None: the model's own precision), a GradScaler for
    float16 (its small exponent range underflows gradients without one), channels-last images and weights.

    One object per run, from :meth:`build`; a method's ``train_one_epoch`` wraps its forward in :meth:`autocast`
    and replaces ``loss.backward(); optimizer.step()`` by :meth:`step`. Evaluation never uses it: features are
    always float32 (``common.engine.extract_features``)."""

    device: torch.device = torch.device("cpu")
    dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    scaler: Optional[torch.amp.GradScaler] = None

    @classmethod
    def build(
        cls,
        device: torch.device,
        amp: bool,
        amp_dtype: str = "bfloat16",
        *,
        cnn: bool = True,
        float64: bool = False,
        main: bool = True,
    ) -> "Precision":
        """From the run's switches. Channels-last for CNNs on CUDA, and on CPU with autocast (oneDNN's low-precision
        convolutions run channels-last; in float32 on CPU it did not pay, see docs/benchmarks.md). ``--float64``
        (the equivalence checks) wins over ``--amp``."""
        if amp_dtype not in AMP_DTYPES:
            raise UserError(f"AMP dtype must be one of {', '.join(AMP_DTYPES)}, got {amp_dtype!r}")
        device = torch.device(device)
        if amp and float64:
            if main:
                print("note: --float64 trains in float64; mixed precision (--amp) is off", flush=True)
            amp = False
        dtype = AMP_DTYPES[amp_dtype] if amp else None
        if dtype is not None and device.type == "cpu" and main and not native_low_precision(dtype):
            print(
                f"note: this CPU has no {amp_dtype} arithmetic in hardware; autocast will be slower than float32",
                flush=True,
            )
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        return cls(device, dtype, cnn and (device.type == "cuda" or dtype is not None), scaler)

    def autocast(self):
        """The forward pass's context: autocast to ``dtype``, or nothing."""
        return autocast(self.device, self.dtype is not None, self.dtype or torch.bfloat16)

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` in this precision's memory format (in place)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip: Optional[Callable[[], None]] = None
    ) -> None:
        """Backward and optimizer step (gradients zeroed by the caller); ``clip()`` sees unscaled gradients."""
        if self.scaler is None:
            loss.backward()
            if clip is not None:
                clip()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip is not None:
            self.scaler.unscale_(optimizer)
            clip()
        self.scaler.step(optimizer)
        self.scaler.update()


def _cxx_compiler() -> Optional[str]:
    """The C++ compiler inductor would use on CPU (its ``cpp.cxx`` search list), if one is on PATH."""
    try:
        from torch._inductor import config

        names = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    except Exception:  # private configuration moved: look for the usual names
        names = ("g++", "c++", "clang++")
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


def maybe_compile(model: nn.Module, enabled: bool, device: torch.device, devices: int = 1) -> nn.Module:
    """``--compile``: ``torch.compile`` of ``model``'s forward, in place (``nn.Module.compile``), so state dicts,
    checkpoints and model files keep their keys. The first steps pay the compilation (minutes on a small CPU).

    Refused in one line where it cannot run: on CPU without a C++ compiler (inductor generates C++), and over
    several GPUs in one process (DataParallel replicas; run one process per GPU with torchrun)."""
    if not enabled:
        return model
    if devices > 1:
        raise UserError("--compile with several GPUs in one process is not supported: use torchrun, one per GPU")
    if COMPILE_BACKEND == "inductor" and torch.device(device).type == "cpu" and _cxx_compiler() is None:
        raise UserError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop --compile")
    model.compile(backend=COMPILE_BACKEND)
    return model


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
