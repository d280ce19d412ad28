"""CPU quotas that make a process compute like a small edge device (cgroup v1 `cpu` controller, as root).

`quota_groups(fractions)` creates one child group per fraction (e.g. 0.25 = a quarter of one core:
cpu.cfs_quota_us = 25 ms per 100 ms period) and removes them on exit, also when interrupted (SIGINT, SIGTERM):
processes still inside are moved back to the root group first. A command runs inside a group through
`enter_command(group, command)`, a shell that moves itself into the group and then execs the command, so every
child it starts (a rank's threads) is limited too.
"""
from __future__ import annotations

import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


def available() -> str | None:
    """None when quotas can be set here, else the reason they cannot (for the benchmark's 'skipped' line)."""
    if os.geteuid() != 0:
        return "emulating edge devices needs root (cgroup cpu quotas)"
    if not (CPU_ROOT / "cpu.cfs_quota_us").is_file():
        return f"no cgroup v1 cpu controller at {CPU_ROOT}"
    return None


def _remove(group: Path) -> None:
    if not group.is_dir():
        return
    for pid in (group / "cgroup.procs").read_text().split():
        try:
            (CPU_ROOT / "cgroup.procs").write_text(pid)  # back to the root group before the group can go
        except OSError:
            pass  # it ended meanwhile
    group.rmdir()


@contextmanager
def quota_groups(fractions: list[float], name: str = "disco-bench"):
    """One cgroup per fraction of a core; yields their paths; always removed afterwards."""
    reason = available()
    if reason:
        raise PermissionError(reason)
    groups = [CPU_ROOT / f"{name}-{os.getpid()}-{k}" for k in range(len(fractions))]
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for group, fraction in zip(groups, fractions):
            group.mkdir()
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(fraction * PERIOD_US))))
        yield groups
    finally:
        for group in groups:
            _remove(group)
        signal.signal(signal.SIGTERM, previous)


def enter_command(group: Path | None, command: list[str]) -> list[str]:
    """`command`, run inside `group` (unchanged when group is None)."""
    if group is None:
        return command
    return ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh", *command]


def run_in(group: Path | None, command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(enter_command(group, command), **kwargs)
