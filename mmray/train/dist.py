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
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

from mmray.checkpoint import unwrap

__all__ = ["all_gather_rows", "all_reduce", "broadcast_buffers", "gather_objects", "print0"]


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


def all_gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows of ``t`` [n_rank, ...], concatenated in rank order (``t`` in one process).

    Ranks may hold different row counts, so the sizes are gathered first and each rank's rows padded to
    the largest for the (equal-shape) all-gather, the padding dropped after. The gather is autograd-aware
    (``torch.distributed.nn``, as open_clip's ``gather_with_grad``): its backward sums every rank's
    gradient for this rank's rows. A loss every rank computes identically over the gathered rows thus
    gives each local row ``world_size`` times its gradient, and DDP's averaging over ranks cancels the
    factor: the parameters' gradients equal one process's over the concatenated batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, max(counts) - t.shape[0]))
    parts = dist_fn.all_gather(padded)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])
