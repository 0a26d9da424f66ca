"""Which process this is under torchrun, and joining the process group early (HF's Trainer reuses it)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["world", "rank", "init_distributed"]


def world() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (RANK from torchrun's environment before the group exists)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def init_distributed(n: int) -> None:
    """Under torchrun (n > 1 processes), join the process group before the recipe is chosen, so every rank can
    take rank 0's choice; gloo on CPU, nccl on CUDA. HF's Trainer then reuses the group."""
    if n <= 1 or not dist.is_available() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
