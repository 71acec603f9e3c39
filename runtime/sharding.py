"""Splitting a batch of files between the ranks of `torchrun --nproc_per_node N -m runtime.upscale ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts. The split is a pure
function of the sorted work list and those numbers (rank r takes items r, r + N, r + 2N, ...),
so every rank computes the same partition on its own: no process group, no communication, no
barrier. Each rank writes its outputs atomically and skips outputs that already exist, so after a
crash the same command finishes only what is missing. On CUDA each rank uses cuda:LOCAL_RANK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence, TypeVar

import torch

T = TypeVar("T")


class ShardingError(ValueError):
    """RANK / WORLD_SIZE / LOCAL_RANK are present but inconsistent."""


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def label(self) -> str:
        """'' for a single process, '[rank 1/4] ' under torchrun (a prefix for messages)."""
        return f"[rank {self.rank}/{self.world_size}] " if self.distributed else ""


def _read_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ShardingError(f"environment variable {name}={value!r} is not an integer") from None


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard:
    """The shard this process is, from torchrun's variables; a single process when they are absent."""
    environ = os.environ if environ is None else environ
    world_size = _read_int(environ, "WORLD_SIZE", 1)
    rank = _read_int(environ, "RANK", 0)
    local_rank = _read_int(environ, "LOCAL_RANK", rank)
    if world_size < 1:
        raise ShardingError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ShardingError(f"RANK must be in [0, WORLD_SIZE) = [0, {world_size}), got {rank}")
    if local_rank < 0:
        raise ShardingError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    return Shard(rank=rank, world_size=world_size, local_rank=local_rank)


def shard_items(items: Sequence[T], shard: Shard) -> list[T]:
    """This rank's items: every world_size-th, starting at rank. `items` must be in the same
    (deterministic, e.g. sorted) order on every rank."""
    return list(items[shard.rank :: shard.world_size])


def device_for_shard(device: torch.device, shard: Shard) -> torch.device:
    """One GPU per rank: a bare 'cuda' becomes cuda:LOCAL_RANK; explicit indices and the CPU stay."""
    if device.type != "cuda" or device.index is not None or not shard.distributed:
        return device
    count = torch.cuda.device_count()
    if shard.local_rank >= count:
        raise ShardingError(f"LOCAL_RANK {shard.local_rank} has no GPU: this node has {count}")
    return torch.device("cuda", shard.local_rank)
