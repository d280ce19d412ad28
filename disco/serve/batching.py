"""Requests into batches: a bounded queue (full: refused at once, never unbounded memory), batches of at most
--max-batch formed within --max-wait-ms of their first request, at most --inflight batches at the ranks. A
batch's requests that ask for different budgets (a deployment carrying several) run as one batch per budget. The
task's answers are computed once per batch (one call per distinct top_k asked), off the event loop."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import torch

from disco.errors import DiscoError
from disco.serve.metrics import ServiceMetrics
from disco.serve.options import ServeOptions
from disco.serve.ranks import RankFailure, Ranks

RETRY_AFTER_S = 1  # overloaded: most batches take well under this


class Refused(DiscoError):
    """A request the service does not answer: an HTTP status, an error kind and a message for the client."""

    def __init__(self, status: int, kind: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.retry_after = status, kind, retry_after


@dataclass
class _Waiting:
    image: torch.Tensor
    top_k: int
    level: int  # the budget level it runs at (disco/runtime/levels.py)
    answer: asyncio.Future


# the task's answers for a batch: (the output's tensors for these images, top_k) -> one dict per image
Answers = Callable[[list[torch.Tensor], int], list[dict]]
# told each batch's level and its seconds at the ranks (disco/serve/adapt.py follows the link with them)
BatchRan = Callable[[int, float], None]


class Batcher:
    def __init__(self, ranks: Ranks, options: ServeOptions, metrics: ServiceMetrics, answers: Answers,
                 batch_ran: BatchRan | None = None):
        self.ranks, self.options, self.metrics, self.answers = ranks, options, metrics, answers
        self.batch_ran = batch_ran
        self.queue: asyncio.Queue[_Waiting] = asyncio.Queue(options.queue_size)
        self.slots = asyncio.Semaphore(options.inflight)
        self.tasks: set[asyncio.Task] = set()  # batches in flight (a reference keeps each task alive)

    async def infer(self, image: torch.Tensor, top_k: int, level: int = 0) -> dict:
        """The task's answer for one image [C, H, W], run at budget level `level`."""
        if not self.ranks.ready:
            raise Refused(503, "not_ready", self.ranks.reason, RETRY_AFTER_S)
        waiting = _Waiting(image, top_k, level, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(waiting)
        except asyncio.QueueFull:
            raise Refused(503, "overloaded", f"{self.options.queue_size} requests are already waiting "
                          "(--queue-size); try again shortly", RETRY_AFTER_S) from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return await waiting.answer

    async def run(self) -> None:
        """Form batches forever (cancelled when the service stops)."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.options.max_wait_ms / 1000
            while len(batch) < self.options.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except TimeoutError:
                    break
            self.metrics.queue_depth.set(self.queue.qsize())
            await self.slots.acquire()
            task = asyncio.create_task(self._dispatch(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _dispatch(self, batch: list[_Waiting]) -> None:
        released = False
        try:
            live = [w for w in batch if not w.answer.done()]  # a client that went away needs no answer
            if not live:
                return
            by_level = [[w for w in live if w.level == level] for level in sorted({w.level for w in live})]
            outputs = []
            for group in by_level:
                self.metrics.batch_size.observe(len(group))
                began = time.perf_counter()
                outputs.append(await self._run(torch.stack([w.image for w in group]), group[0].level))
                if self.batch_ran is not None:
                    self.batch_ran(group[0].level, time.perf_counter() - began)
            self.slots.release()  # the ranks are free for the next batch while this one's answers are made
            released = True
            for group, leaves in zip(by_level, outputs):
                answered = await asyncio.to_thread(self._answer, leaves, [w.top_k for w in group])
                for waiting, answer in zip(group, answered):
                    if not waiting.answer.done():
                        waiting.answer.set_result(answer)
        except Exception as error:  # noqa: BLE001 - every request of the batch gets an answer, never a hang
            refusal = error if isinstance(error, Refused) else \
                Refused(500, "internal_error", f"the batch failed: {type(error).__name__}: {error}")
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(refusal)
        finally:
            if not released:
                self.slots.release()

    def _answer(self, leaves: list[torch.Tensor], top_ks: list[int]) -> list[dict]:
        """Each image's answer: the task's answer function called once per distinct top_k of the batch."""
        answers: list[dict | None] = [None] * len(top_ks)
        for top_k in set(top_ks):
            rows = [i for i, k in enumerate(top_ks) if k == top_k]
            picked = torch.tensor(rows)
            for row, answer in zip(rows, self.answers([leaf[picked] for leaf in leaves], top_k)):
                answers[row] = answer
        return answers

    async def _run(self, images: torch.Tensor, level: int) -> list[torch.Tensor]:
        try:
            batch, future = await asyncio.to_thread(self.ranks.submit, images, level)
        except RankFailure as error:
            raise Refused(503, "not_ready", str(error), RETRY_AFTER_S) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.options.batch_timeout_s)
        except TimeoutError:
            self.ranks.expire(batch)
            raise Refused(503, "rank_failed", f"rank 0 did not answer within {self.options.batch_timeout_s:g} s; "
                          "it is hung", RETRY_AFTER_S) from None
        except RankFailure as error:
            raise Refused(503, "rank_failed", str(error), RETRY_AFTER_S) from None
