"""Training runs killed with SIGKILL at chosen instants, then resumed until they finish (for
tests/test_crash_resume.py).

usage: python tests/crash_driver.py PLAN.json RESULT.json

PLAN: {"config": TrainConfig fields but out, "reference": {"out": FOLDER, "trace": FILE},
       "scenarios": [{"out": FOLDER, "kills": [KILL, ...]}, ...]}
The reference is one uninterrupted run; it writes the calls it made, [[call, label], ...], to its trace file.
A scenario starts a run in a process killed at its first KILL, resumes it in a process killed at the second,
and so on, then resumes it once more to let it finish. A KILL is either
  {"call": "replace", "label": "checkpoints/.tmp-0002 -> checkpoints/0002", "nth": 1, "when": "before"}:
      the process kills itself just before (or "after") the nth call of a wrapped function with that label;
  {"at_fraction": 0.4}: this driver kills the process from outside once 0.4 of the reference's time has passed.
Wrapped functions, by call name: replace, rename, fsync (os), save_file (safetensors.torch), torch.save and
rmtree (shutil), wrapped here by monkeypatching: the code under test has no hooks for this. A label names the
call's paths relative to the run folder ("." is the folder itself; fsync's from its file descriptor).
Scenarios run in two lanes at once (one per core; each attempt uses one thread), the reference alone before them.
RESULT: {"reference": ATTEMPT, "scenarios": [[ATTEMPT, ...], ...]}, ATTEMPT = {"outcome": "killed" |
"finished" | "failed", "seconds": wall time}.

Each attempt is a process forked from this one, which has imported torch but computed nothing with it (no
thread pools to break a fork): one import for all attempts instead of seconds of imports per attempt.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import safetensors.torch
import torch

from disco.training import pipeline
from disco.training.config import TrainConfig

WRAPPED = {"replace": (os, "replace"), "rename": (os, "rename"), "fsync": (os, "fsync"),
           "save_file": (safetensors.torch, "save_file"), "torch.save": (torch, "save"), "rmtree": (shutil, "rmtree")}


def _relative(out: str, path) -> str:
    if isinstance(path, int):  # a file descriptor
        path = os.readlink(f"/proc/self/fd/{path}")
    if not isinstance(path, (str, os.PathLike)):
        return "<stream>"
    relative = os.path.relpath(os.path.realpath(path), out)
    return "<outside>" if relative.startswith("..") else relative


def _label(out: str, call: str, args: tuple) -> str:
    if call in ("replace", "rename"):
        return f"{_relative(out, args[0])} -> {_relative(out, args[1])}"
    if call in ("save_file", "torch.save"):  # (what, where)
        return _relative(out, args[1])
    return _relative(out, args[0])  # fsync(fd), rmtree(path)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _trace_calls(out: Path, calls: list, kill: dict | None) -> None:
    """Record every wrapped call in `calls`; SIGKILL this process at the one `kill` names."""
    folder = os.path.realpath(out)
    for call, (module, name) in WRAPPED.items():
        def traced(*args, _call=call, _original=getattr(module, name), **kwargs):
            label = _label(folder, _call, args + tuple(kwargs.values()))
            calls.append([_call, label])
            chosen = (kill is not None and kill.get("call") == _call and kill["label"] == label
                      and calls.count([_call, label]) == kill.get("nth", 1))
            if chosen and kill.get("when", "before") == "before":
                _die()
            result = _original(*args, **kwargs)
            if chosen:
                _die()
            return result
        setattr(module, name, traced)


def _attempt(config: dict, out: Path, kill: dict | None, trace: str | None) -> None:
    """In the forked child: start or resume the run; never returns."""
    try:
        torch.set_num_threads(1)  # deterministic kernels, and the speed of one core per process
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # the pipeline prints a line per epoch and the report
        calls: list = []
        _trace_calls(out, calls, kill)
        if (out / "config.json").is_file():
            pipeline.resume(out)
        else:  # killed before the run folder existed (a timer kill): start it as a user would
            pipeline.train(TrainConfig(**config, out=str(out)))
        if trace:
            Path(trace).write_text(json.dumps(calls))
    except BaseException:  # noqa: BLE001 - the child must never return into the driver's loop
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _run_attempt(config: dict, out: Path, kill: dict | None, *, reference_seconds: float | None,
                 trace: str | None = None) -> dict:
    began = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        _attempt(config, out, kill if kill and "call" in kill else None, trace)
    if kill and "at_fraction" in kill:
        time.sleep(kill["at_fraction"] * reference_seconds)
        os.kill(child, signal.SIGKILL)  # no effect once the child has exited (it stays a zombie until waited)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        outcome = "killed"
    else:
        outcome = "finished" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "failed"
    return {"outcome": outcome, "seconds": time.perf_counter() - began}


def _scenario(config: dict, scenario: dict, reference_seconds: float) -> list[dict]:
    out = Path(scenario["out"])
    attempts = []
    for kill in [*scenario["kills"], None]:  # None: the last resume, left to finish
        attempts.append(_run_attempt(config, out, kill, reference_seconds=reference_seconds))
        if attempts[-1]["outcome"] == "failed":
            break
    return attempts


def _lanes(config: dict, scenarios: list[dict], reference_seconds: float, result_path: str) -> list[list[dict]]:
    """The scenarios split over one lane per core (each attempt runs on one thread): a lane is a process forked
    from this single-threaded driver that runs its share in order and writes their attempts to a file."""
    lanes = max(1, min(2, os.cpu_count() or 1, len(scenarios)))
    children = {}
    for lane in range(lanes):
        child = os.fork()
        if child == 0:
            try:
                share = {k: _scenario(config, scenarios[k], reference_seconds)
                         for k in range(lane, len(scenarios), lanes)}
                Path(f"{result_path}.lane{lane}").write_text(json.dumps(share))
            except BaseException:  # noqa: BLE001 - the lane must never return into the driver
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        children[lane] = child
    attempts: dict[int, list[dict]] = {}
    for lane, child in children.items():
        _, status = os.waitpid(child, 0)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise RuntimeError(f"lane {lane} of the crash driver failed (status {status})")
        attempts.update({int(k): v for k, v in json.loads(Path(f"{result_path}.lane{lane}").read_text()).items()})
    return [attempts[k] for k in range(len(scenarios))]


def main(plan_path: str, result_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    config = plan["config"]
    reference = _run_attempt(config, Path(plan["reference"]["out"]), None, reference_seconds=None,
                             trace=plan["reference"]["trace"])
    scenarios = _lanes(config, plan["scenarios"], reference["seconds"], result_path)
    Path(result_path).write_text(json.dumps({"reference": reference, "scenarios": scenarios}))


if __name__ == "__main__":
    main(*sys.argv[1:])
