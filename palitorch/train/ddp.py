"""Data parallelism with plain torch.distributed: one process per device, launched by `torchrun`.

Every process holds the whole model and takes a disjoint, contiguous slice of each global batch. Gradients are
summed over processes by all-reduce once per optimizer step (after gradient accumulation), each process having
scaled its loss by 1 / (tokens in the GLOBAL batch): the sum is then exactly the gradient of the single-process mean,
so one process and N processes with the same global batch follow the same loss curve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from palitorch.errors import ConfigError

BUCKET_ELEMENTS = 1 << 24  # gradients are all-reduced in flat buckets of at most this many elements
JOINED = False  # this process joined a process group (palitorch/__main__.py then leaves without the teardown)


def init_group(backend: str, rank: int, world: int, **kw) -> None:
    """`init_process_group`, noting that this process joined one."""
    global JOINED
    dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    JOINED = True


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE env); gloo on CPU, nccl on CUDA.

    Returns the rank info and this process's device. Without torchrun it is a single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device == "cuda" and max(local + 1, local_world) > torch.cuda.device_count():  # the same check on every rank
        raise ConfigError(f"[train] device cuda: {max(local + 1, local_world)} processes on this machine and "
                          f"{torch.cuda.device_count()} GPUs visible: one process needs one GPU")
    dev = torch.device(f"cuda:{local}" if device == "cuda" else "cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        init_group("nccl" if device == "cuda" else "gloo", rank, world)
    return Dist(rank, world, local), dev


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, d: Dist) -> slice:
    """The contiguous part of n items that process d.rank takes (sizes differ by at most one)."""
    lo = n * d.rank // d.world
    hi = n * (d.rank + 1) // d.world
    return slice(lo, hi)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Sum every parameter's gradient over the processes, through flat buckets (few collective calls)."""
    if not d.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None and (not bucket or (size + g.numel() <= BUCKET_ELEMENTS and g.dtype == bucket[0].dtype)):
            bucket.append(g)
            size += g.numel()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset: offset + b.numel()].view_as(b))
                offset += b.numel()
        bucket, size = ([g], g.numel()) if g is not None else ([], 0)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def gather_tensor(t: torch.Tensor, d: Dist) -> list[torch.Tensor]:
    """Every process's copy of a same-shaped tensor, in rank order (all-gather)."""
    if not d.enabled:
        return [t]
    out = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(out, t)
    return out


def all_reduce_min(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t
