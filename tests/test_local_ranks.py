"""The front end names the first of this host's ranks to end: checked on real processes that carry a RANK (as
torchrun's workers do) beside one that does not."""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from disco.serve.local_ranks import first_to_end, local_ranks

def _pidfds_work() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
        return os.path.isdir("/proc/self/task")
    except (AttributeError, OSError):  # not Linux, or a kernel/sandbox without pidfds
        return False


pytestmark = pytest.mark.skipif(not _pidfds_work(), reason="needs Linux /proc and pidfds (Linux 5.3+)")


@pytest.fixture
def processes():
    ranked = [subprocess.Popen(["sleep", "60"], env={**os.environ, "RANK": str(rank)}) for rank in (0, 1, 2)]
    unranked = subprocess.Popen(["sleep", "60"], env={k: v for k, v in os.environ.items() if k != "RANK"})
    yield ranked, unranked
    for process in [*ranked, unranked]:
        process.kill()
        process.wait()


def test_only_ranked_children_are_ranks(processes):
    ranked, unranked = processes
    assert local_ranks(os.getpid()) == {process.pid: rank for rank, process in enumerate(ranked)}


def test_the_first_rank_to_end_is_named(processes):
    ranked, _ = processes
    threading.Timer(0.3, ranked[2].send_signal, args=(signal.SIGKILL,)).start()
    assert first_to_end(local_ranks(os.getpid()), lambda: True) == (ranked[2].pid, 2)


def test_a_watch_no_longer_wanted_returns_nothing(processes):
    wanted = threading.Event()
    wanted.set()
    threading.Timer(0.3, wanted.clear).start()
    assert first_to_end(local_ranks(os.getpid()), wanted.is_set) is None
