"""Ranks do not outlive their launcher: torchrun starts each rank in a session of its own, so a SIGKILL of torchrun
(or of `disco serve`) would otherwise leave them running for nobody. Checked on real processes: a launcher that
starts a process calling the rank's own watch, then is killed. And what the service says when torchrun is gone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from disco.runtime.orphans import ORPHAN_POLL_S
from disco.serve.ranks import ended_reason

RANK = ("import sys, time\n"
        "from disco.runtime.orphans import end_with_launcher\n"
        "end_with_launcher('1')\n"
        "print('watching', flush=True)\n"
        "time.sleep(120)\n")
LAUNCHER = ("import subprocess, sys, time\n"
            "rank = subprocess.Popen([sys.executable, '-c', sys.argv[1]], start_new_session=True,\n"
            "                        stderr=open(sys.argv[2], 'w'))\n"
            "print(rank.pid, flush=True)\n"
            "time.sleep(120)\n")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; whoever adopted it reaps it


def test_a_rank_ends_when_its_launcher_is_killed(tmp_path):
    stderr = tmp_path / "rank.err"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(stderr)], stdout=subprocess.PIPE,
                                text=True)
    try:
        rank = int(launcher.stdout.readline())
        assert launcher.stdout.readline().strip() == "watching"  # the rank inherited the launcher's stdout
        assert _running(rank)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10 * ORPHAN_POLL_S + 5
        while _running(rank) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(rank), "the rank outlived its launcher"
        assert f"its launcher (pid {launcher.pid}) ended; ending too" in stderr.read_text()
    finally:
        launcher.kill()
        if _running(rank):
            os.kill(rank, signal.SIGKILL)


def test_the_service_says_how_torchrun_ended_and_the_restarts_that_happened():
    killed = ended_reason(-9, 0, None)
    assert "torchrun was killed by signal 9)" in killed and "restart" in killed and "after" not in killed
    assert "exited with code 1 after 1 restart): rank 1 hung" in ended_reason(1, 1, "rank 1 hung")
    assert "after 3 restarts" in ended_reason(1, 3, None)
