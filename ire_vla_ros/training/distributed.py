"""Multi-process SFT (Stage 0 / Stage 2) with torch.distributed, started by `torchrun`.

    torchrun --nproc_per_node 4 -m ire_vla_ros.cli train sft --episodes EP --checkpoints CK
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m ire_vla_ros.cli train sft ...

Nothing changes for a single process: without torchrun's environment (WORLD_SIZE unset or 1) every
helper here is a no-op. Under torchrun: nccl on GPUs (one per local rank), gloo on CPU; the trainable
part of the policy (LoRA + action head) is wrapped in DistributedDataParallel; every rank draws the
same *global* batch from the same seeded generator (so the expert/online weighted sampling is the
single-process one) and trains on its shard of it; DDP averages the gradients, so N x B/N steps equal
one B step up to float summation order. Only rank 0 logs progress and writes checkpoints. A rank that
dies makes torchrun stop the others (its default, max_restarts=0): the run fails, and since
checkpoints are written atomically by rank 0 after training, `latest` stays what it was.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo()


def info() -> DistInfo:
    return _INFO


def init_from_env(device: str = "cpu", timeout_s: float = 300.0) -> DistInfo:
    """Join the process group torchrun describes in the environment; returns this rank's DistInfo.

    `device` is the configured training device: "cuda..." selects nccl and this local rank's GPU
    (returned device string via `device_for`), anything else gloo. A no-op outside torchrun.
    """
    global _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _INFO
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=local_rank)
    return _INFO


def device_for(device: str) -> str:
    """The device this rank trains on: its own GPU under torchrun, else `device` unchanged."""
    if _INFO.enabled and str(device).startswith("cuda"):
        return f"cuda:{_INFO.local_rank}"
    return device


def shard(global_indices, di: DistInfo | None = None):
    """This rank's contiguous slice of a global batch (its size must divide by the world size)."""
    di = di or _INFO
    n = len(global_indices)
    if n % di.world_size:
        raise ValueError(f"global batch {n} does not divide by {di.world_size} processes")
    per = n // di.world_size
    return global_indices[di.rank * per:(di.rank + 1) * per]


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (for logging the global loss); identity in one process."""
    if not _INFO.enabled:
        return value
    import torch.distributed as dist

    v = value.detach().clone()
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return v / _INFO.world_size


def barrier() -> None:
    if _INFO.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    global _INFO
    if _INFO.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _INFO = DistInfo()


class SFTObjective(nn.Module):
    """The SFT loss as one module (what DDP wraps): its parameters are exactly what SFT trains.

    The backbone (LoRA trainable, base frozen) and the actor are submodules; the critic is not, so
    DDP never waits for gradients SFT does not produce.
    """

    def __init__(self, policy, loss_fn):
        super().__init__()
        self.backbone = policy.backbone
        self.actor = policy.actor
        object.__setattr__(self, "_policy", policy)  # not a submodule: no critic parameters here
        object.__setattr__(self, "_loss_fn", loss_fn)

    def forward(self, images, states, actions, instructions):
        return self._loss_fn(self._policy, images, states, actions, instructions)


def wrap_for_training(policy, loss_fn):
    """DDP(SFTObjective) under torchrun, else None (the caller uses loss_fn directly)."""
    if not _INFO.enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel

    module = SFTObjective(policy, loss_fn)
    dev = policy.device
    # find_unused_parameters: the MSE on the mean gives the actor's log-std no gradient.
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=True)
