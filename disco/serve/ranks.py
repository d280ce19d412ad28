"""The deployment's ranks under `disco serve`: started by torchrun (with its elastic restarts), rank 0 linked
to the front end, and whether they are ready.

Ready means rank 0 said hello: every rank verified its shard and joined, and all agreed on the manifest. A
batch is sent to rank 0 with an id and answered by id. When rank 0 reports a failed batch (a peer died or
hung: its message names the rank), or its link closes (rank 0 itself died), or it does not answer a batch in
time (hung: the front end kills it), every batch in flight fails with that reason and the service is not
ready until a restarted rank 0 says hello again. torchrun restarts the whole group up to --restarts times;
when it gives up, the service stays up, not ready, and says why.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, InvalidStateError

import torch

from disco.errors import DiscoError
from disco.runtime.launch import rank_environment, relay_rank_output, torchrun_command
from disco.serve.local_ranks import first_to_end, local_children, local_ranks
from disco.runtime.link import Link, LinkClosed, LinkListener
from disco.serve.metrics import ServiceMetrics
from disco.serve.options import ServeOptions

RANK_ERROR = "disco serve: rank "  # how a rank's one-line error starts (disco/runtime/worker.py)
HELLO_TIMEOUT_S = 60.0  # a rank 0 that connected but says nothing: its handshake is broken
STOP_TIMEOUT_S = 30.0


class RankFailure(DiscoError):
    """A batch could not be answered: the ranks are not ready, or one failed (the message says which)."""


def _settle(future: Future, *, result=None, error: BaseException | None = None) -> None:
    """Answer a batch's future unless the front end gave up on it already (cancelled when it expired)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def ended_reason(code: int, restarted: int, last_error: str | None) -> str:
    """Why the service has no ranks any more, from torchrun's exit status (negative: the signal that killed it)
    and the restarts that did happen (not the ones allowed)."""
    ended = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    after = f" after {restarted} restart{'s' * (restarted != 1)}" if restarted else ""
    return (f"the ranks have ended (torchrun {ended}{after}){': ' + last_error if last_error else ''}; "
            "restart `disco serve`")


class Ranks:
    def __init__(self, options: ServeOptions, nodes: int, metrics: ServiceMetrics, *, deployment: str,
                 quiet: bool = False):
        """`deployment`: the identity (Manifest.identity) of the manifest the service describes; ranks that loaded
        another are refused."""
        self.options, self.nodes, self.metrics, self.quiet = options, nodes, metrics, quiet
        self.deployment = deployment
        self.listener = LinkListener(max_bytes=1 << 31)
        self.lock = threading.Lock()
        self.link: Link | None = None
        self.ready, self.reason = False, "the ranks are starting"
        self.ended = False  # torchrun exited: no rank will come back
        self.hellos = 0
        self.pending: dict[int, Future] = {}
        self.ids = itertools.count()
        self.process: subprocess.Popen | None = None
        self.stopping = False
        self.last_error: str | None = None  # rank 0's last error message: why it is about to end

    # --- starting and stopping -------------------------------------------------------------------------------
    def start(self) -> None:
        local_ranks = self.nodes if self.options.nnodes == 1 else 1
        worker_args = ["--serve", "--quiet", "--timeout", str(self.options.timeout), "--inflight",
                       str(self.options.inflight), "--backend", self.options.backend]
        for flag, value in (("--model-code", self.options.model_code), ("--verify-key", self.options.verify_key)):
            worker_args += [flag, value] if value else []
        command = torchrun_command(self.options.deploy, local_ranks, worker_args, restarts=self.options.restarts,
                                   hosts=self.options.nnodes, rdzv_endpoint=self.options.rdzv_endpoint)
        env = {**rank_environment(local_ranks, self.options.threads), **self.listener.environment()}
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, bufsize=1,
                                        start_new_session=True)  # Ctrl-C reaches the front end, which stops them
        for target in (self._accept_forever, self._relay_stderr, self._watch_torchrun):
            threading.Thread(target=target, daemon=True, name=f"disco-serve{target.__name__}").start()

    def stop(self) -> None:
        """Ask rank 0 to stop the ranks; torchrun is terminated if they do not end in time."""
        self.stopping = True
        with self.lock:
            link = self.link
        asked = False
        if link is not None:
            with contextlib.suppress(LinkClosed):
                link.send({"kind": "stop"})
                asked = True
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.wait(STOP_TIMEOUT_S if asked else 0.1)  # ranks not ready cannot be asked: ended
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(STOP_TIMEOUT_S)
        self.listener.close()

    # --- batches ------------------------------------------------------------------------------------------------
    def submit(self, images: torch.Tensor, level: int = 0) -> tuple[int, Future]:
        """Send a batch to rank 0, to run at budget level `level`; the future gets the output's tensors (pytree
        leaves) or a RankFailure."""
        future: Future = Future()
        with self.lock:
            if not self.ready:
                raise RankFailure(self.reason)
            batch, link = next(self.ids), self.link
            self.pending[batch] = future
        try:
            link.send({"kind": "batch", "batch": batch, "level": level}, {"input": images})
        except LinkClosed:
            self._lost(link, "rank 0 ended (its link closed)")
        return batch, future

    def expire(self, batch: int) -> None:
        """Rank 0 did not answer `batch` in time: call it hung and fail what is in flight (the local ranks are
        killed, so that torchrun restarts the group: a process that does not answer cannot be asked to stop)."""
        with self.lock:
            link = self.link
            if batch not in self.pending:
                return
        self._lost(link, f"rank 0 did not answer within {self.options.batch_timeout_s:g} s; it is hung")

    # --- what rank 0 says ---------------------------------------------------------------------------------------
    def _accept_forever(self) -> None:
        while not self.stopping:
            try:
                link = self.listener.accept()  # only a connection that proved the key (runtime/link.py)
            except OSError:
                return  # the listener was closed: stopping
            threading.Thread(target=self._read, args=(link,), daemon=True, name="disco-serve-link").start()

    def _read(self, link: Link) -> None:
        try:
            hello = link.receive(timeout=HELLO_TIMEOUT_S)
            if hello is None or hello[0].get("kind") != "hello":
                link.close()
                return
            if hello[0].get("deployment") != self.deployment:
                self._refuse_other_deployment(link)
                return
            self._joined(link, hello[0])
            while True:
                header, tensors = link.receive()
                self._handle(link, header, tensors)
        except LinkClosed:
            self._lost(link, self.last_error or "rank 0 ended (its link closed; it probably died)")
        except Exception as error:  # noqa: BLE001 - a malformed message: treat rank 0 as failed
            self._lost(link, f"rank 0 sent a malformed message ({type(error).__name__}: {error})")
            link.close()

    def _refuse_other_deployment(self, link: Link) -> None:
        """The folder was exported again while it was served, and the ranks (restarted) loaded the new export:
        answers would come from one model while /v1/model describes the other. The ranks are stopped for good."""
        with self.lock:
            self.last_error = (f"the deployment in {self.options.deploy} changed while it was served (exported "
                               "again?): the ranks loaded the new one, this service describes the old one")
            self.ready, self.reason = False, self.last_error
        self.metrics.ready.set(0)
        with contextlib.suppress(LinkClosed):
            link.send({"kind": "stop"})
        if not self.quiet:
            print(f"disco serve: not ready: {self.last_error}; restart `disco serve`", file=sys.stderr, flush=True)

    def _joined(self, link: Link, hello: dict) -> None:
        with self.lock:
            self.link = link
            self.ready, self.reason, self.last_error = True, "", None
            self.hellos += 1
            restarted = self.hellos > 1
        self.metrics.ready.set(1)
        threading.Thread(target=self._watch_local_ranks, args=(link,), daemon=True,
                         name="disco-serve-local-ranks").start()
        if restarted:
            self.metrics.restarts.inc()
        if not self.quiet:
            print(f"disco serve: ready: {hello.get('world')} ranks joined ({hello.get('backend')}), shards and "
                  f"manifest verified" + (" (after a restart)" if restarted else ""), file=sys.stderr, flush=True)

    def _handle(self, link: Link, header: dict, tensors: dict) -> None:
        kind = header.get("kind")
        if kind == "counters":
            self.metrics.bytes_sent.update(header["sent"])
            return
        with self.lock:
            future = self.pending.pop(header.get("batch"), None) if header.get("batch") is not None else None
        if kind == "output" and future is not None:
            _settle(future, result=[tensors[str(i)] for i in range(len(tensors))])
        elif kind == "error":
            message = header.get("message", "rank 0 failed")
            if future is not None:
                _settle(future, error=RankFailure(message))
            self.last_error = message

    def _lost(self, link: Link | None, reason: str) -> None:
        """Rank 0 of `link` is gone or hung: not ready, and every batch in flight fails with `reason` (and whether
        the ranks are being restarted)."""
        reason += "; restarting the ranks" if self._will_restart() else ""
        with self.lock:
            if link is not None and link is not self.link:
                return  # an earlier rank 0, already replaced
            failed, self.pending = self.pending, {}
            self.link, self.ready = None, False
            self.reason = reason if not self.ended else self.reason
        self.metrics.ready.set(0)
        for future in failed.values():
            _settle(future, error=RankFailure(reason))
        if not self.stopping:
            self._end_local_ranks()
            if not self.quiet:
                print(f"disco serve: not ready: {reason}", file=sys.stderr, flush=True)

    def _watch_local_ranks(self, link: Link) -> None:
        """While `link`'s ranks serve, the first of this host's ranks to end is named at once (rank 0 reports a
        dead peer too, but torchrun may stop rank 0 before it can)."""
        if self.process is None:
            return
        ended = first_to_end(local_ranks(self.process.pid), lambda: self.link is link and not self.stopping)
        if ended is not None and not self.stopping:
            pid, rank = ended
            self._lost(link, f"rank {rank} (pid {pid}, on this host) ended; it probably crashed or was killed "
                             f"(see its own error above)")

    def _end_local_ranks(self) -> None:
        """SIGKILL this host's ranks: the group is broken, and torchrun restarts at once only when none is left
        (a hung rank ignores its SIGTERM, and torchrun then waits 30 s before killing it, and measured here, the
        group it starts next does not form). Linux: torchrun's children are read from /proc."""
        if self.process is None or self.process.poll() is not None:
            return
        for pid in local_children(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _will_restart(self) -> bool:
        return self.options.restarts > max(0, self.hellos - 1) and not self.ended

    # --- torchrun -----------------------------------------------------------------------------------------------
    def _relay_stderr(self) -> None:
        for line in relay_rank_output(self.process.stderr, self.options.verbose):
            if RANK_ERROR in line:  # any rank's last word: the batches in flight fail with it at once
                self._rank_failed(line[line.index(RANK_ERROR) + len("disco serve: "):].strip())

    def _rank_failed(self, message: str) -> None:
        """A rank said why it is ending (rank 1: "no answer from rank 0 within 5 s"): rank 0 may be unable to."""
        with self.lock:
            link, self.last_error = self.link, self.last_error or message
        if link is not None:
            self._lost(link, message)

    def _watch_torchrun(self) -> None:
        code = self.process.wait()
        with self.lock:
            self.ended = True
            if not self.stopping:
                self.reason = ended_reason(code, max(0, self.hellos - 1), self.last_error)
            link = self.link
        self._lost(link, self.reason)
