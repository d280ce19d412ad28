"""The front end names the first of this host's ranks to end: checked on real processes that carry a RANK (as
torchrun's workers do) beside one that does not."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

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


def test_threads_ending_while_the_children_are_listed_hide_no_rank(processes):
    """The front end's own threads start and end all the time; one that ends while /proc lists the task folder
    must not drop the ranks its siblings started (this made CI see no rank at all)."""
    ranked, _ = processes
    expected = {process.pid: rank for rank, process in enumerate(ranked)}
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            threads = [threading.Thread(target=time.sleep, args=(0.001,)) for _ in range(40)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    churners = [threading.Thread(target=churn) for _ in range(2)]
    for churner in churners:
        churner.start()
    try:
        seen = [local_ranks(os.getpid()) for _ in range(400)]
    finally:
        stop.set()
        for churner in churners:
            churner.join()
    assert all(found == expected for found in seen)
