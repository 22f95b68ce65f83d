"""One process per device with torch.distributed, degrading to a plain single process (torchvision ``utils`` style).

* ``launch(worker, args, num_procs, ...)`` runs ``worker(args)`` in ``num_procs`` processes spawned by
  torch.multiprocessing (one per GPU with NCCL, or CPU processes with gloo), or in this process when launched by
  ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment) or when ``num_procs == 1``.
* The rank helpers answer rank 0 of 1 when no process group exists, so single-process code needs no branches
  (FastRetri's SyncBN crashed single-GPU runs exactly because it assumed a process group, fast-reid #667).
* ``all_gather_by_index`` reassembles evaluation features that every rank computed for its own sample indices,
  so no sample is padded or duplicated the way ``DistributedSampler`` does.
"""
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistInfo", "is_dist_avail_and_initialized", "get_world_size", "get_rank", "is_main_process",
           "barrier", "launched_by_torchrun", "launch", "init_process", "cleanup", "all_reduce_mean",
           "all_reduce_sum_with_grad", "all_gather_by_index", "free_port"]


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
    """An unused TCP port on this machine for the spawned processes' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process(backend: str, use_cuda: bool, rank: Optional[int] = None, world_size: Optional[int] = None,
                 local_rank: Optional[int] = None, device_ids: Optional[Sequence[int]] = None) -> DistInfo:
    """Join the process group (env:// rendezvous) and pick this process's device; no group for one process.

    ``device_ids`` maps local ranks to GPU indices (``--gpu_ids``); by default local rank i uses GPU i.
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
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                **({"device_id": device} if backend == "nccl" else {}))
    return DistInfo(rank, world_size, local_rank, device)


def cleanup() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def _spawned(local_rank: int, worker: Callable[[Any, DistInfo], Any], args: Any, num_procs: int, backend: str,
             use_cuda: bool, device_ids: Optional[Sequence[int]]) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(num_procs))
    info = init_process(backend, use_cuda, local_rank, num_procs, local_rank, device_ids)
    try:
        worker(args, info)
    finally:
        cleanup()


def launch(worker: Callable[[Any, DistInfo], Any], args: Any, num_procs: int = 1, backend: str = "auto",
           use_cuda: bool = False, device_ids: Optional[Sequence[int]] = None) -> Any:
    """Run ``worker(args, info)`` once per process; returns its result in the single-process case.

    ``worker`` must be a module-level function (it is pickled for the spawned processes).
    """
    if launched_by_torchrun() or num_procs <= 1:
        info = init_process(backend, use_cuda, device_ids=device_ids)
        try:
            return worker(args, info)
        finally:
            cleanup()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    mp.spawn(_spawned, args=(worker, args, num_procs, backend, use_cuda, device_ids), nprocs=num_procs, join=True)
    return None


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a (detached) tensor over all ranks; the tensor itself with one process."""
    if get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / get_world_size()


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
        pad_f = torch.zeros(longest, dim, dtype=torch.float32, device=device)
        pad_i = torch.full((longest,), -1, dtype=torch.long, device=device)
        pad_f[:len(indices)], pad_i[:len(indices)] = features.float().to(device), indices.to(device)
        all_f = [torch.empty_like(pad_f) for _ in sizes]
        all_i = [torch.empty_like(pad_i) for _ in sizes]
        dist.all_gather(all_f, pad_f)
        dist.all_gather(all_i, pad_i)
        gathered_feats = [f[:int(n)].cpu() for f, n in zip(all_f, sizes)]
        gathered_idx = [i[:int(n)].cpu() for i, n in zip(all_i, sizes)]
    idx = torch.cat(gathered_idx)
    if len(idx) != total or not torch.equal(torch.sort(idx).values, torch.arange(total)):
        raise RuntimeError(f"all_gather_by_index: ranks hold {len(idx)} rows for {total} samples "
                           "(missing or duplicated indices)")
    out = torch.empty(total, gathered_feats[0].shape[1], dtype=torch.float32)
    out[idx] = torch.cat(gathered_feats).float()
    return out
