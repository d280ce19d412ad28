"""A rank ends when the process that started it is gone. torchrun starts each rank in a session of its own, so a
SIGKILL of torchrun (or of `disco serve` above it) would otherwise leave the ranks running for nobody, holding
their ports and memory. Torch-free, so that the check costs a rank nothing to import."""
from __future__ import annotations

import os
import sys
import threading
import time

ORPHAN_POLL_S = 0.5


def end_with_launcher(rank: str) -> None:
    """Watch, in a daemon thread, for this process's parent to change (it was adopted: its launcher ended), and
    then end the process at once, saying why."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(ORPHAN_POLL_S)
        print(f"disco: rank {rank}: its launcher (pid {launcher}) ended; ending too", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="disco-end-with-launcher").start()
