"""This host's rank processes, seen from the front end (Linux /proc and pidfds; nothing elsewhere).

torchrun's workers are its children; the front end is not their parent, so it cannot wait() on them. A pidfd
(Linux 5.3+) still becomes readable the moment the process ends, which tells the service which rank died
first: rank 0 would report a dead peer too, but torchrun may stop rank 0 before it has said so.
"""
from __future__ import annotations

import os
import select
from pathlib import Path
from typing import Callable

POLL_S = 0.5  # how often a watcher checks whether it is still wanted


def local_children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc; empty elsewhere or when it has ended)."""
    return [int(child) for path in Path(f"/proc/{pid}/task").glob("*/children")
            for child in _read_or_empty(path).split()]


def _read_or_empty(path: Path) -> str:
    # Threads come and go while the task folder is listed (the front end runs server and watcher threads):
    # one that ended in between has no file left, which must not hide its siblings' children.
    try:
        return path.read_text()
    except OSError:
        return ""


def rank_of(pid: int) -> int | None:
    """The RANK torchrun gave process `pid`, or None when it has none (not a rank) or cannot be read."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = [entry[len(b"RANK="):] for entry in environ if entry.startswith(b"RANK=")]
    return int(values[0]) if values and values[0].isdigit() else None


def local_ranks(torchrun_pid: int) -> dict[int, int]:
    """{pid: rank} of torchrun's rank processes on this host."""
    found = {pid: rank_of(pid) for pid in local_children(torchrun_pid)}
    return {pid: rank for pid, rank in found.items() if rank is not None}


def first_to_end(ranks: dict[int, int], wanted: Callable[[], bool]) -> tuple[int, int] | None:
    """Wait until one of `ranks` ({pid: rank}) ends: its (pid, rank); None once `wanted()` turns false, or
    where pidfds are not available."""
    if not hasattr(os, "pidfd_open") or not ranks:
        return None
    handles: dict[int, int] = {}
    try:
        for pid in ranks:
            try:
                handles[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                return pid, ranks[pid]  # already gone
        while wanted():
            ended, _, _ = select.select(list(handles), [], [], POLL_S)
            if ended:
                pid = handles[ended[0]]
                return pid, ranks[pid]
        return None
    except OSError:
        return None  # pidfds refused here (an old kernel, a sandbox): rank 0's reports still name the rank
    finally:
        for handle in handles:
            os.close(handle)
