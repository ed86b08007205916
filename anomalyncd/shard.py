"""One stage over the processes of ``torchrun``: which rows each rank takes, and how its part
of a store is gathered into the one store.

Each rank writes its rows to a part store beside the output (``.<name>.part-<rank>-of-<world>``,
written atomically like any store); after a barrier rank 0 reads the parts in rank order, which
is the order of the rows, writes the one store and removes the parts. Blocks are contiguous and
start on multiples of the batch size, so every batch holds the same rows as in one process:
the store is the same, byte for byte. Outside ``torchrun`` there is one rank and one part.
Several machines work the same way when the output folder is on a shared filesystem.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .io import pid_alive
from .store import StoreReader, StoreWriter, chunk_rows

def start(device: str = "cpu") -> tuple[int, int, str]:
    """Join ``torchrun``'s process group when launched by it: ``(rank, world size, device)``.

    gloo on CPU; with CUDA, NCCL and ``cuda:LOCAL_RANK``. Outside torchrun ``(0, 1, device)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and device == "cpu":
        return 0, 1, device  # without importing torch (mebin needs none)
    import torch  # here, not above: mebin and its worker processes need no torch
    import torch.distributed as dist

    from .device import resolve_device

    device = resolve_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return rank, world, device


def clear_parts(path: str | os.PathLike, rank: int) -> None:
    """Before a stage writes its parts: rank 0 removes what an earlier run left, the others wait."""
    if rank == 0:
        remove_parts(path)
    barrier()


def finish() -> None:
    """Leave the process group (after the last barrier)."""
    if _dist() is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def _dist():
    """``torch.distributed`` when a process group is up (only then is torch imported), else None."""
    import sys

    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable: a detector's state dict)."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def block(n: int, rank: int, world: int, align: int = 1) -> range:
    """The contiguous rows ``[a, b)`` of ``n`` that ``rank`` of ``world`` takes.

    Whole groups of ``align`` rows (a batch) are dealt out as evenly as possible, in rank order,
    the first ranks taking one more: rank 0 has rows whenever there are any.
    """
    groups = -(-n // max(1, align))
    per, extra = divmod(groups, world)
    a = rank * per + min(rank, extra)
    b = a + per + (rank < extra)
    return range(min(n, a * align), min(n, b * align))


def describe(stage: str, rank: int, world: int, rows: range, what: str) -> str:
    """The line a rank prints under torchrun: which rows it takes."""
    if not len(rows):
        return f"{stage}: rank {rank}/{world} takes no {what} (fewer batches than processes)"
    return f"{stage}: rank {rank}/{world} takes {what} {rows.start}..{rows.stop - 1} ({len(rows)} of them)"


def part_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """Where ``rank`` writes its part of the store ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.part-{rank}-of-{world}")


def part_paths(path: str | os.PathLike, world: int) -> list[Path]:
    return [part_path(path, r, world) for r in range(world)]


def remove_parts(path: str | os.PathLike) -> None:
    """Remove every part of ``path``: this run's, or those a killed run left (with the
    temporaries of a part being written, ``..<name>.part-*.tmp-<pid>*``, whose process is gone)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f".{path.name}.part-*"):
        if p.is_file():
            p.unlink()
    stale = re.compile(rf"\.\.{re.escape(path.name)}\.part-\d+-of-\d+\.tmp-(\d+)(\..+)?")
    for p in path.parent.glob(f"..{path.name}.part-*"):
        m = stale.fullmatch(p.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


class Parts:
    """The part stores of one output, read as one: rows in rank order."""

    def __init__(self, paths: Sequence[Path], kind: str) -> None:
        self.readers = [StoreReader(p, kind) for p in paths]

    def rows(self, name: str) -> int:
        return sum(len(r[name]) for r in self.readers)

    def chunks(self, name: str, stop: int | None = None, size: int | None = None) -> Iterator[np.ndarray]:
        """Rows ``[0, stop)`` of array ``name``, ``size`` at a time (default: a stored chunk's
        worth, about ``store.CHUNK_BYTES``), in order."""
        left = self.rows(name) if stop is None else stop
        if size is None:
            first = self.readers[0][name]
            size = chunk_rows(first.shape[1:], first.dtype)
        for r in self.readers:
            rows = r[name]
            for a in range(0, min(len(rows), left), size):
                yield rows[a : min(a + size, len(rows), left)]
            left -= min(len(rows), left)
            if left <= 0:
                return

    def take(self, name: str, index: Sequence[int]) -> np.ndarray:
        """Rows ``index`` (global, in the given order) of array ``name``."""
        bounds = np.cumsum([0] + [len(r[name]) for r in self.readers])
        out = []
        for i in index:
            p = int(np.searchsorted(bounds, i, side="right") - 1)
            out.append(self.readers[p][name][int(i - bounds[p])])
        return np.stack(out) if out else np.zeros((0,), np.float32)

    def names(self) -> list[str]:
        return list(self.readers[0].names)

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> "Parts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def concatenate(parts: Parts, writer: StoreWriter) -> None:
    """Append every array of ``parts`` to ``writer`` in row order; the arrays under ``masks/``
    (one per image, named by its index in the whole set) are copied as they are."""
    for name in parts.names():
        if not name.startswith("masks/"):
            first = parts.readers[0][name]
            writer.declare(name, first.shape[1:], first.dtype)
            for rows in parts.chunks(name):
                writer.append(name, rows)
    for r in parts.readers:
        for name in r.names:
            if name.startswith("masks/"):
                writer.put(name, r.read(name))
