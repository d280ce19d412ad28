"""Rank 0 under `disco serve`: batches come from the HTTP front end over its link (disco/runtime/link.py), run on
the Coordinator's lanes like any batch, and their outputs go back the same way.

A batch that fails (a peer died or hung: PeerFailure names it) is answered with an error, and then this rank
ends with that error: the process group is broken, and torchrun's restarts (`disco serve --restarts K`) start
a fresh one. Between batches, at most once per COUNTERS_EVERY_S, rank 0 gathers every rank's bytes sent (the
front end's /metrics).
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future

from torch.utils._pytree import tree_leaves

from disco.errors import DiscoError
from disco.export.manifest import Manifest
from disco.runtime.inputs import check_input
from disco.runtime.roles import Coordinator
from disco.runtime.link import Link, LinkClosed

COUNTERS_EVERY_S = 1.0
POLL_S = 0.2  # how often the receive loop looks up from the link to see whether a lane failed
KEEPALIVE_FRACTION = 0.25  # an idle rank 0 says it is alive every this fraction of --timeout


class _Failure:
    """The first failure of any lane, raised again in the receive loop (which ends the rank)."""

    def __init__(self):
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def record(self, error: BaseException) -> None:
        with self.lock:
            self.error = self.error or error


def _reply(link: Link, batch: int, future: Future, failure: _Failure) -> None:
    try:
        output = future.result()
        link.send({"kind": "output", "batch": batch},
                  {str(i): leaf.cpu() for i, leaf in enumerate(tree_leaves(output))})
    except LinkClosed as error:  # the front end is gone: nothing to answer to
        failure.record(error)
    except BaseException as error:  # noqa: BLE001 - the request gets it; then the rank ends with it
        _say_error(link, batch, error)
        failure.record(error)


def _say_error(link: Link, batch: int | None, error: BaseException) -> None:
    message = str(error) if isinstance(error, DiscoError) else f"{type(error).__name__}: {error}"
    try:
        link.send({"kind": "error", "batch": batch, "message": message})
    except LinkClosed:
        pass


def answer_requests(coordinator: Coordinator, manifest: Manifest, link: Link, backend: str) -> dict:
    """Serve the front end's batches until it says stop (or goes away); every rank is stopped after."""
    link.send({"kind": "hello", "pid": os.getpid(), "world": coordinator.comm.world, "backend": backend,
               "inflight": len(coordinator.lanes), "deployment": manifest.identity()})
    failure, last_counters, ran_since = _Failure(), time.monotonic(), False
    last_word, keepalive_s = time.monotonic(), coordinator.comm.timeout * KEEPALIVE_FRACTION
    while True:
        if failure.error is not None:
            raise failure.error
        try:
            message = link.receive(timeout=POLL_S)
        except LinkClosed:
            break  # the front end stopped: stop the ranks cleanly
        if message is None:
            if ran_since and time.monotonic() - last_counters >= COUNTERS_EVERY_S:
                link.send({"kind": "counters", "sent": coordinator.gather_counters()})
                last_counters, ran_since = time.monotonic(), False
            elif time.monotonic() - last_word >= keepalive_s:
                coordinator.keep_alive()
            else:
                continue
            last_word = time.monotonic()
            continue
        header, tensors = message
        if header.get("kind") == "stop":
            break
        batch = header.get("batch")
        try:  # the front end checked it already; rank 0 trusts nothing it did not check itself
            images = tensors.get("input")
            check_input(images, manifest)
            level = header.get("level")
            if level is not None and (not isinstance(level, int) or isinstance(level, bool)):
                raise DiscoError(f"a batch's budget level must be a whole number, got {level!r}")
            future = coordinator.submit(images, level=level)  # a level the deployment lacks: refused here
        except DiscoError as error:
            _say_error(link, batch, error)
            continue
        future.add_done_callback(lambda done, batch=batch: _reply(link, batch, done, failure))
        ran_since, last_word = True, time.monotonic()
    if coordinator.pool is not None:  # the batches in flight are answered before the ranks stop
        coordinator.pool.shutdown(wait=True)
    if failure.error is not None and not isinstance(failure.error, LinkClosed):
        raise failure.error
    coordinator.stop()
    link.close()
    return {"metric": None, "score": None, "accuracy": None, "predictions": [], "latencies_s": coordinator.latencies,
            "images": coordinator.images, "images_run": coordinator.images, "images_per_s": coordinator.images_per_s(),
            "inflight": len(coordinator.lanes)}
