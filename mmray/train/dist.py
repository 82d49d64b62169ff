"""The few collectives the training loop needs, each the identity in a single process.

Every helper works with or without an initialised process group, so the loop's pieces run unchanged
in a unit test (one process, no Ray) and on a DDP worker group. ``print0`` is the one helper for
rank-0-only side effects in logs.
"""

from __future__ import annotations

from typing import Any

import ray.train
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmray.checkpoint import unwrap

__all__ = ["all_reduce", "broadcast_buffers", "gather_objects", "print0"]


def print0(*args: Any) -> None:
    """Prints on the rank-0 worker only."""
    if ray.train.get_context().get_world_rank() == 0:
        print(*args, flush=True)


def all_reduce(t: Tensor) -> Tensor:
    """Sums ``t`` over all workers (identity in one process); returns it on the CPU."""
    if dist.is_available() and dist.is_initialized():
        # nccl reduces CUDA tensors only; gloo takes CPU tensors. float64 keeps counts exact.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()


def broadcast_buffers(model: nn.Module) -> None:
    """Copies rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each training forward, so after the last batch each rank
    holds its own update; without this, ranks would validate slightly different models, none of them
    exactly the one rank 0 checkpoints.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in unwrap(model).buffers():
            dist.broadcast(buf.data, src=0)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
