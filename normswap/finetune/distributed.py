"""One process or many: the same recipe under ``torchrun --nproc_per_node N`` uses torch.distributed
(gloo on CPU, NCCL on CUDA) with DDP, or FSDP as an option. Nothing here launches processes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place: rank, world size, device; ``active`` when a process group is running."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    active: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_mean(self, values: list[float]) -> list[float]:
        """The mean of each value over the ranks (the values themselves in one process)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: object) -> list[object]:
        """Every rank's ``obj``, in rank order."""
        if not self.active:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto") -> Dist:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, dev, world > 1)


def full_model_state(model: nn.Module, d: Dist, mode: str) -> dict[str, torch.Tensor] | None:
    """The whole state dict on CPU (gathered from the shards under FSDP; collective, call on every rank).
    ``None`` when the model is not sharded (its own ``state_dict()`` is whole)."""
    if not (d.active and mode == "fsdp"):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist, mode: str) -> dict:
    """The optimizer's state dict, whole (gathered under FSDP; collective)."""
    if not (d.active and mode == "fsdp"):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, d: Dist, mode: str) -> None:
    """Load a whole optimizer state dict (sharded out to the ranks under FSDP; collective)."""
    if not (d.active and mode == "fsdp"):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def wrap(model: nn.Module, d: Dist, mode: str) -> nn.Module:
    """``model`` for training across ranks: DDP, or FSDP2 (``fully_shard``) with ``mode="fsdp"``."""
    if not d.active:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if module is not model and len(list(module.children())) > 0 and sum(p.numel() for p in module.parameters()) > 1e6:
                fully_shard(module)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
