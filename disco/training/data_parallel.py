"""Data-parallel training: `torchrun --nproc-per-node G [--nnodes H ...] -m disco train ...` (docs/method.md 12).

Every process holds the whole model and trains on its own micro-batches of each step (disco/training/batches.py);
DistributedDataParallel averages the weights' gradients (NCCL on GPUs, gloo on CPUs). What DDP does not cover is
here, as the training's side of the communication (the runtime's is disco/runtime/comm.py; the two never share a
process group):

- the masks' gradients (buffers, which DDP leaves alone) are averaged before the Sparsifier reads them, so every
  process ranks the groups alike; each cut's masks are then broadcast from rank 0, so they are identical by
  construction, whatever the arithmetic did;
- BatchNorm's running statistics (each process measured its own batches) are averaged before a model is scored
  or saved;
- decisions that read the run folder are taken by rank 0 and broadcast, and rank 0 alone writes.

One process (no torchrun) is the same code with a world of one, where all of this does nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from disco.errors import DiscoError
from disco.split.modules import running_norms

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # a collective waits this long for a dead or stuck peer


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel group."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # joined the process group itself (then leaves it on close)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model that trains: DDP over the group (its weights and buffers copied from rank 0), or itself."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers are copied from rank 0 once, not at each forward: they hold the split plans and masks (identical
        # on every rank) and BatchNorm's statistics, averaged when they are read (average_norm_statistics)
        no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                           inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        # gradients as views of DDP's buckets: no copy, and the channels-last weights' layout
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **no_forward_sync)

    def accumulating(self, model: nn.Module, more_to_come: bool):
        """Context of a backward pass: gradients stay local while more micro-batches of the step follow."""
        if self.distributed and more_to_come:
            return model.no_sync()
        return contextlib.nullcontext()

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the processes (one collective for all of them)."""
        def mean(flat: torch.Tensor) -> None:
            dist.all_reduce(flat)
            flat /= self.world

        self._coalesced(tensors, mean)

    def _coalesced(self, tensors: list[torch.Tensor], collective) -> None:
        """`collective` run once, in place, on all the tensors flattened into one float64 vector (exact for
        float32 values and 0/1 masks), then each tensor's part copied back into it."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
        collective(flat)
        offset = 0
        with torch.no_grad():
            for tensor in tensors:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def total(self, values: list[float]) -> list[float]:
        """Each value summed over the processes."""
        if not self.distributed:
            return list(values)
        summed = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return summed.tolist()

    def share(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into each tensor on every process."""
        self._coalesced(tensors, lambda flat: dist.broadcast(flat, src=0))

    def from_main(self, value: int) -> int:
        """Rank 0's `value` on every process (a decision that reads the run folder, taken once)."""
        if not self.distributed:
            return value
        held = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(held, src=0)
        return int(held.item())

    def average_norm_statistics(self, model: nn.Module) -> None:
        """BatchNorm running means and variances averaged over the processes (their counts are equal)."""
        self.average([tensor for norm in running_norms(model) for tensor in (norm.running_mean, norm.running_var)])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def settle_strides(model: nn.Module) -> None:
    """Weights whose channels-last strides differ from plain ones only on a dimension of size 1 (a depthwise
    conv's [C, 1, k, k]) get plain strides, the ones autograd gives their gradients: DDP's gradient buckets
    take the weights' strides and warn, once per process, about every mismatch. The values do not move. Done
    once, when the model is built, for one process too: the same strides, the same kernels, the same arithmetic
    in every run and in every model copied from it (the teacher, a resumed run's)."""
    for parameter in model.parameters():
        plain = torch.empty(parameter.shape).stride()
        if parameter.is_contiguous() and parameter.stride() != plain:
            parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)


def join(device: str | None = None) -> DataParallel:
    """The group torchrun started this process in (WORLD_SIZE above 1), or one process on its own. `device`:
    cpu or cuda (default: cuda when this machine has one); each process takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted not in ("cpu", "cuda") and not wanted.startswith("cuda:"):
        raise DiscoError(f"--device must be cpu or cuda, got {device!r}")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise DiscoError("--device cuda: no GPU is visible to this process")
    if world == 1:
        return DataParallel(device=torch.device(wanted))
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise DiscoError("WORLD_SIZE is set without RANK and MASTER_ADDR: start data-parallel training with "
                         "`torchrun --nproc-per-node G -m disco train ...`")
    if wanted.startswith("cuda"):
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(chosen)
        backend = "nccl"
    else:
        chosen, backend = torch.device("cpu"), "gloo"
    joining = not dist.is_initialized()  # a caller that set up the group itself keeps it
    if joining:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return DataParallel(rank=dist.get_rank(), world=dist.get_world_size(), device=chosen, owns_group=joining)
