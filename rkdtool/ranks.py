"""Several processes, one job: what `torchrun` gives a rank (DDP), and nothing at all in one process.

`torchrun --nproc-per-node N -m rkdtool distill ...` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; `Ranks.from_env()` reads them and joins the process group (NCCL for CUDA, gloo on the CPU).
Every rank trains the same student on its shard of each global batch (DistributedDataParallel averages
the gradients), so the student is the one-process student of the same global batch up to BatchNorm's
per-shard statistics. Only rank 0 writes the run folder and prints; the others follow it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Ranks:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @staticmethod
    def from_env() -> Ranks:
        """Gives back this process's place in a torchrun job (one process when WORLD_SIZE is unset or 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Ranks()
        return Ranks(world, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))

    def join(self, device: torch.device) -> torch.device:
        """Joins the process group (once) and gives back this rank's device: cuda:LOCAL_RANK for CUDA."""
        if not self.distributed:
            return device
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def leave(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def from_main(self, obj):
        """Gives back rank 0's `obj` on every rank (pickled; for settings, paths and stand-in pools)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """Gives back this rank's rows of a global batch (rank r takes rows r, r + world, ...)."""
        return batch[self.rank :: self.world] if self.distributed else batch

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Gives back the mean of `value` over the ranks."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world

    def broadcast_module(self, module: nn.Module) -> None:
        """Overwrites every parameter and buffer of `module` with rank 0's (detox masks, fitted once)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def largest_difference(self, module: nn.Module) -> float:
        """Gives back max |rank 0's value - this rank's| over `module`'s parameters, maximised over ranks."""
        if not self.distributed:
            return 0.0
        import torch.distributed as dist

        worst = torch.zeros(())
        with torch.no_grad():
            for p in module.parameters():
                mine = p.detach().float().cpu()
                theirs = mine.clone()
                dist.broadcast(theirs, src=0)
                worst = torch.maximum(worst, (mine - theirs).abs().max())
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return float(worst)

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": _backend() if self.distributed else None}


def _backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else None


def wrap_learner(distiller: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """Gives back the module the trainer calls: `distiller` itself, or under torchrun DDP over it with the
    teacher left out (frozen, eval, unwrapped: its parameters and buffers are neither synced nor broadcast),
    so only the student and its connectors take part."""
    if not ranks.distributed:
        return distiller
    from torch.nn.parallel import DistributedDataParallel

    teacher = [f"teacher.{name}" for name, _ in distiller.teacher.named_parameters()]
    teacher += [f"teacher.{name}" for name, _ in distiller.teacher.named_buffers()]
    # DDP's own hook for leaving parameters and buffers out (a static method since torch 1.8, not in the
    # public docs; torch 2.4-2.14 keep it).
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, teacher)
    return DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None)
