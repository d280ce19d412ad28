"""`disco run`: start N local ranks through torchrun (torch.distributed.run, by disco/runtime/torchrun.py) and relay
their output.

torchrun's own report of a failed child (a long traceback) is held back unless --verbose: each rank
already printed one line saying what went wrong."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from disco.errors import DiscoError
from disco.export.manifest import Manifest
from disco.export.signing import verify_deployment
from disco.export.trust import model_to_build


def torchrun_command(deploy: str, local_ranks: int, worker_args: list[str], *, restarts: int = 0, hosts: int = 1,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """torchrun starting `local_ranks` ranks here: all of them (one host), or, on several hosts, node rank 0's."""
    where = ["--standalone"] if hosts == 1 else [f"--nnodes={hosts}", "--node-rank=0",
                                                 f"--rdzv-endpoint={rdzv_endpoint}"]
    return [sys.executable, "-m", "disco.runtime.torchrun", *where, f"--nproc-per-node={local_ranks}",
            f"--max-restarts={restarts}", "-m", "disco.runtime", deploy, *worker_args]


def rank_environment(local_ranks: int, threads: int | None) -> dict[str, str]:
    """The ranks' environment: this one, with a share of the cores each, quiet profilers, loopback when local."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // local_ranks)))
    env.setdefault("KINETO_LOG_LEVEL", "5")  # --profile: no "gpuGetDeviceCount failed" lines on a CPU-only host
    if Path("/sys/class/net/lo").exists():  # all ranks are local: do not depend on how the hostname resolves
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def is_torchrun_noise(line: str) -> bool:
    return line.startswith(("*****", "Setting OMP_NUM_THREADS")) or (line[:1] in "WIE" and line[1:5].isdigit())


def relay_rank_output(lines, verbose: bool):
    """Copy torchrun's stderr to ours, holding back its tracebacks and log lines unless `verbose` (each rank says
    what went wrong in one line of its own); yields every line, shown or not, to the caller."""
    in_traceback = False
    for line in lines:
        from_rank = line.startswith("[rank")  # a rank's own output (torchrun prefixes it): always shown
        in_traceback = not from_rank and (in_traceback or line.startswith("Traceback") or "ChildFailedError" in line)
        if verbose or not (in_traceback or is_torchrun_noise(line)):
            sys.stderr.write(line)
        yield line


def launch(deploy: str, worker_args: list[str], *, nodes: int | None = None, threads: int | None = None,
           verbose: bool = False, verify_key: str | None = None, model_code: str | None = None,
           budget: float | None = None) -> int:
    if verify_key is not None:  # refused here, once, rather than by every rank
        verify_deployment(deploy, verify_key)
    manifest = Manifest.load(deploy)
    manifest.level_of(budget)  # a budget the deployment lacks: refused before any rank starts
    model_to_build(manifest.model, model_code)  # the model file is hashed, never imported, here
    nodes = nodes or manifest.nodes
    if nodes != manifest.nodes:
        raise DiscoError(f"{deploy} is split across {manifest.nodes} nodes; --nodes {nodes} does not match")
    process = subprocess.Popen(torchrun_command(deploy, nodes, worker_args), env=rank_environment(nodes, threads),
                               stderr=subprocess.PIPE, text=True, bufsize=1)
    rank_said_why = False
    for line in relay_rank_output(process.stderr, verbose):
        rank_said_why = rank_said_why or "disco run: rank" in line  # with or without torchrun's prefix
    code = process.wait()
    if code and not verbose and not rank_said_why:  # e.g. a rank killed by a signal: it could not say why
        print(f"disco run: a rank failed (exit code {code}) without saying why; run with --verbose for torchrun's "
              "report", file=sys.stderr)
    return code
