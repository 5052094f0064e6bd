"""Data-parallel training under ``torchrun``: process group, feature gathering, gradient averaging.

Launch the way torchrun does everything (one node or several)::

    torchrun --nproc_per_node 8 -m otcbench train DATA OUT --defense otcclip --set train.batch_size=1024
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 \\
        -m otcbench train …        # and --node_rank 1 on the second node

``train.batch_size`` is the *global* batch: each of the W processes takes a contiguous 1/W of every
step's rows. The contrastive loss is computed over the gathered global batch on every rank (features
are gathered *with* gradient, as open_clip's ``gather_with_grad``), so the loss — and, up to
BatchNorm statistics, which stay per process — the gradient equal a single process's with the same
global batch. Gradients are averaged explicitly after ``backward`` instead of by a DDP wrapper: the
defenses call the towers through ``encode_image``/``encode_text``/``encode_fine_grained`` rather than
``forward``, which a ``DistributedDataParallel`` wrapper would not see (its all-reduce is armed by
``forward``). Gradients go in one flat buffer, one all-reduce per step.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from otcbench.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment variables (single process when unset)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("WORLD_SIZE/RANK/LOCAL_RANK must be integers (set by torchrun); unset them "
                        "to train in one process") from None
    return DistInfo(rank, world, local)


def current() -> DistInfo:
    """The running process group's info (single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def init_distributed(device_type: str) -> DistInfo:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); a no-op in a single process."""
    info = env_dist_info()
    if not info.enabled:
        return info
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; train in one process")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return info


def shard(n: int, info: DistInfo | None = None) -> tuple[int, int]:
    """The contiguous ``[lo, hi)`` slice of ``n`` items this rank handles (sizes differ by at most 1)."""
    info = info or current()
    base, extra = divmod(n, info.world_size)
    lo = info.rank * base + min(info.rank, extra)
    return lo, lo + base + (1 if info.rank < extra else 0)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` (same shape on all ranks) along dim 0, keeping the autograd graph."""
    if not current().enabled:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 when shard sizes differ (no gradient): for data-side steps."""
    info = current()
    if not info.enabled:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)], dim=0)


def average_gradients(model: torch.nn.Module) -> None:
    """Average parameter gradients over ranks (one all-reduce on a flat buffer)."""
    info = current()
    if not info.enabled:
        return
    # Every rank must reduce the same buffer layout: a parameter unused on one rank gets a zero gradient.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def destroy() -> None:
    """Leave the process group (at the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
