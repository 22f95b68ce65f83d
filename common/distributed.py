"""One process per device with torch.distributed, degrading to a plain single process (torchvision ``utils`` style).

* ``torchrun`` starts the processes (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment);
  :func:`launch_elastic` is the same launcher called from Python, for a script's own ``--num-gpus N`` flag.
* The rank helpers answer rank 0 of 1 when no process group exists, so single-process code needs no branches
  (FastRetri's SyncBN crashed single-GPU runs exactly because it assumed a process group, fast-reid #667).
* ``all_gather_by_index`` reassembles evaluation features that every rank computed for its own sample indices,
  so no sample is padded or duplicated the way ``DistributedSampler`` does.
* The global batch stays the paper's at any number of processes: ``common.samplers.RankBatchSampler`` cuts each
  global batch into per-rank slices (class groups intact), :func:`all_gather_with_grad` lets a batch-dependent loss
  see the global batch, and :class:`GlobalBatchNorm` normalises with global-batch statistics (on CPU/gloo as well, where
  ``nn.SyncBatchNorm`` refuses to run).
"""

import atexit
import os
import signal
import socket
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from common.errors import UserError

__all__ = [
    "DistInfo",
    "is_dist_avail_and_initialized",
    "get_world_size",
    "get_rank",
    "is_main_process",
    "barrier",
    "launched_by_torchrun",
    "launch_elastic",
    "init_process",
    "cleanup",
    "all_reduce_mean",
    "all_reduce_sum_with_grad",
    "all_gather_by_index",
    "free_port",
    "init_distributed",
    "share_cpu_cores",
    "broadcast_object",
    "gather_object",
    "all_gather_with_grad",
    "GlobalBatchNorm",
    "convert_global_batchnorm",
    "wrap_ddp",
]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    """An unused TCP port on this machine (a test server's, a rendezvous's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process(
    backend: str,
    use_cuda: bool,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    local_rank: Optional[int] = None,
    device_ids: Optional[Sequence[int]] = None,
) -> DistInfo:
    """Join the process group (env:// rendezvous) and pick this process's device; no group for one process.

    The process leaves the group when it exits, whichever script or error ends it: one that exits still inside a gloo
    group can abort in the group's teardown and fail a launch whose work is done. ``device_ids`` maps local ranks to
    GPU indices (``--gpu_ids``); by default local rank i uses GPU i.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
    device = torch.device("cpu")
    if use_cuda:
        index = device_ids[local_rank] if device_ids else local_rank
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    if world_size > 1 and not is_dist_avail_and_initialized():
        backend = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            **({"device_id": device} if backend == "nccl" else {}),
        )
        atexit.register(cleanup)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def launch_elastic(entrypoint: Callable[..., Any], args: Sequence[Any], num_procs: int) -> None:
    """``entrypoint(*args)`` in ``num_procs`` processes on this machine, started by PyTorch's elastic launcher as
    ``torchrun --standalone --nproc_per_node num_procs`` starts a script (no restarts); ``entrypoint`` must be a
    module-level function, pickled for the processes.

    A process's :class:`UserError` becomes this process's (one ``error:`` line); any other failure of a process ends
    all of them and exits with its exit code; Ctrl-C ends all of them (KeyboardInterrupt here)."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=num_procs,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    try:
        elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
        if message.startswith(f"{UserError.__name__}: "):
            raise UserError(message.split(": ", 1)[1]) from None
        print(f"error: process {rank} of {num_procs} failed (exit code {failure.exitcode})", file=sys.stderr)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)
    except SignalException as e:
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        sys.exit(128 + int(e.sigval))


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a (detached) tensor over all ranks; the tensor itself with one process."""
    if get_world_size() == 1:
        return value
    device = value.device
    if dist.get_backend() == "nccl" and device.type != "cuda":  # NCCL reduces GPU tensors only
        value = value.to(torch.device("cuda", torch.cuda.current_device()))
    value = value.detach().clone()
    dist.all_reduce(value)
    return (value / get_world_size()).to(device)


class _AllReduceSum(torch.autograd.Function):
    """y = sum_r x_r on every rank; dL/dx_r = sum_r' dL_r'/dy, which is again an all-reduce of the gradients."""

    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum_with_grad(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks that gradients flow back through (for batch statistics over the global batch)."""
    if get_world_size() == 1:
        return value
    return _AllReduceSum.apply(value)


def all_gather_by_index(features: torch.Tensor, indices: torch.Tensor, total: int) -> torch.Tensor:
    """``[total, D]`` on every rank from each rank's rows ``features[i]`` for sample ``indices[i]``.

    Ranks may hold different numbers of rows (no padding samples); every index in ``0..total-1`` must be covered
    exactly once, which is checked, so a sharding bug cannot silently change Recall@K.
    """
    features, indices = features.detach(), indices.detach().long().cpu()
    if get_world_size() == 1:
        gathered_feats, gathered_idx = [features.cpu()], [indices]
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(get_world_size())]
        dist.all_gather(sizes, torch.tensor([len(indices)], device=device))
        longest = max(int(s) for s in sizes)
        dim = features.shape[1] if features.dim() == 2 else 0
        pad_f = torch.zeros(longest, dim, dtype=features.dtype, device=device)
        pad_i = torch.full((longest,), -1, dtype=torch.long, device=device)
        pad_f[: len(indices)], pad_i[: len(indices)] = features.to(device), indices.to(device)
        all_f = [torch.empty_like(pad_f) for _ in sizes]
        all_i = [torch.empty_like(pad_i) for _ in sizes]
        dist.all_gather(all_f, pad_f)
        dist.all_gather(all_i, pad_i)
        gathered_feats = [f[: int(n)].cpu() for f, n in zip(all_f, sizes)]
        gathered_idx = [i[: int(n)].cpu() for i, n in zip(all_i, sizes)]
    idx = torch.cat(gathered_idx)
    if len(idx) != total or not torch.equal(torch.sort(idx).values, torch.arange(total)):
        raise RuntimeError(
            f"all_gather_by_index: ranks hold {len(idx)} rows for {total} samples (missing or duplicated indices)"
        )
    out = torch.empty(total, gathered_feats[0].shape[1], dtype=gathered_feats[0].dtype)
    out[idx] = torch.cat(gathered_feats)
    return out


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group when started by ``torchrun`` (NCCL on GPUs, gloo on CPU); rank 0 of 1 otherwise.

    Under torchrun each process takes GPU ``LOCAL_RANK``; CPU processes split the cores between them so N processes
    on one machine do not starve each other.
    """
    if not launched_by_torchrun():
        return DistInfo()
    use_cuda = use_cuda and torch.cuda.is_available()
    info = init_process("auto", use_cuda)
    if not use_cuda:
        share_cpu_cores(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return info


def share_cpu_cores(processes: int) -> None:
    """Each of ``processes`` CPU processes on one machine takes its share of the cores as torch threads (torchrun's
    ``OMP_NUM_THREADS=1`` would leave the rest idle; more threads than cores stall every parallel op)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, processes)))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (metrics decided once, so every rank takes the same branch)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """Every rank's ``obj`` in rank order on rank ``dst`` (None on the others); ``[obj]`` in one process."""
    if get_world_size() == 1:
        return [obj]
    box = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, box, dst=dst)
    return box


class _GatherWithGrad(torch.autograd.Function):
    """Rows of every rank concatenated in rank order; backward sums the gradients of all ranks and returns this
    rank's slice. Every rank computes the same loss on the global batch, so the summed gradient is N times the
    loss's gradient, which DDP's averaging over N ranks brings back to exactly the 1-process gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(get_world_size())]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        sizes = [int(n) for n in sizes]
        longest = max(sizes)
        padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, get_rank()
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The global batch of ``x`` (rank order) with gradients flowing back to every rank's own rows."""
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """The global batch of a tensor that needs no gradient (labels, sample indices, key-encoder embeddings)."""
    if get_world_size() == 1:
        return x
    with torch.no_grad():
        return _GatherWithGrad.apply(x.detach())


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d or 2d) normalising with the statistics of the global batch of all ranks in training.

    One process: exactly ``nn.BatchNorm``. Several: sums and squared sums are all-reduced with gradients, so the
    forward and backward equal one process's on the concatenated batch. Works on CPU (gloo) and GPU (NCCL).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or get_world_size() == 1 or not self.track_running_stats:
            return super().forward(x)
        xc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        dims = [0] + list(range(2, x.dim()))
        count = xc.new_tensor([x.numel() / x.shape[1]])
        total = all_reduce_sum_with_grad(torch.cat([xc.sum(dims), (xc * xc).sum(dims), count]))
        c, n = x.shape[1], total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - momentum).add_(
                momentum * (var * n / (n - 1).clamp(min=1)).to(self.running_var.dtype)
            )
        shape = [1, c] + [1] * (x.dim() - 2)
        out = (xc - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every trainable-statistics BatchNorm by :class:`GlobalBatchNorm` with the same parameters and
    buffers (``nn.SyncBatchNorm.convert_sync_batchnorm``'s role). Layers in eval mode stay what they are: a frozen
    BatchNorm does not depend on the batch."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        like = next((t for t in (module.running_mean, module.weight) if t is not None), None)
        if like is not None:
            new.to(device=like.device, dtype=like.dtype)
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_global_batchnorm(child))
    return module


def wrap_ddp(model: nn.Module, info: DistInfo, global_batchnorm: bool = True) -> nn.Module:
    """DistributedDataParallel over the process group (global-batch BatchNorm first, unless ``global_batchnorm`` is
    False: a model that chooses its BatchNorm layers itself, as FastRetri's MODEL.BACKBONE.NORM); the model itself
    alone."""
    if not info.distributed:
        return model
    if global_batchnorm:
        model = convert_global_batchnorm(model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
