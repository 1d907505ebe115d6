"""Process-group setup that works the same alone, under `deepspeed` and under `torchrun`."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or form) the process group; returns (rank, world_size, device).

    A bare `python`/`memory3` run has no launcher environment, so we describe a world of one
    ourselves instead of letting DeepSpeed fall back to MPI discovery.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        _unlink_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm file per rank (69 MB) and never unlinks it,
    so every run, and every killed one, would hold that much RAM until the machine restarts
    (a day of test runs here left 22 GB and a hung 2-rank run). Each rank opens every rank's
    file inside init_distributed; after a barrier the names can go and the mappings stay."""
    if dist.get_world_size() > 1:
        dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def barrier():
    if dist.is_initialized():
        dist.barrier()
