"""What one served deployment holds (`Service`: manifest, task, ranks, batcher, metrics, the budget adapter), and
how a route reaches it: `create_app` puts it in the app's state, a handler asks for `ServiceDep`."""
from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import asdict
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from disco.errors import DiscoError
from disco.export.manifest import Manifest
from disco.export.trust import build_deployed_model
from disco.serve.adapt import BudgetAdapter
from disco.serve.answers import task_answers, warm_up
from disco.serve.batching import Batcher, Refused
from disco.serve.metrics import ServiceMetrics
from disco.serve.admission import PixelBudget
from disco.serve.options import ServeOptions
from disco.serve.ranks import Ranks
from disco.tasks.registry import get_task


class Service:
    """Everything one served deployment holds: its manifest, ranks, batcher and metrics."""

    def __init__(self, options: ServeOptions, *, quiet: bool = False):
        self.options, self.quiet = options, quiet
        self.manifest = Manifest.load(options.deploy)
        self.task = get_task(self.manifest.task)
        if self.manifest.preprocess is None:
            raise DiscoError(f"{options.deploy} records no image preprocessing (export it from a training run): "
                             "the service would not know how to read images")
        warm_up(self.manifest)
        self.default_level = self.manifest.level_of(options.budget)  # a budget it lacks: refused at start
        self.budgets = self._budget_table()
        self.adapter = None if options.latency_target_ms is None else BudgetAdapter(
            levels=len(self.budgets), level=self.default_level, target_s=options.latency_target_ms / 1000)
        self.metrics = ServiceMetrics()
        self.metrics.budget_level.set(self.default_level)
        self.ranks = Ranks(options, self.manifest.nodes, self.metrics, deployment=self.manifest.identity(),
                           quiet=quiet)
        # detection answers are decoded on this side (anchors, NMS: weight-free parts of the model)
        self.detector = build_deployed_model(self.manifest.model, options.model_code).eval() \
            if self.task.decodes_with_model else None
        self.decoding = PixelBudget(options.decode_pixels, options.queue_size)
        self.batcher = Batcher(self.ranks, options, self.metrics,
                               functools.partial(task_answers, manifest=self.manifest, detector=self.detector),
                               self._batch_ran)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.ranks.start()
        batching = asyncio.create_task(self.batcher.run())
        try:
            yield
        finally:
            batching.cancel()
            await asyncio.to_thread(self.ranks.stop)

    def level_of(self, budget: float | None) -> int:
        """The level a request runs at: its ?budget=, or the service's default (or the adapter's, following
        the link: --latency-target-ms)."""
        if budget is None:
            return self.default_level if self.adapter is None else self.adapter.current()
        try:
            return self.manifest.level_of(budget)
        except DiscoError as error:
            raise Refused(422, "bad_budget", str(error)) from None

    def _batch_ran(self, level: int, seconds: float) -> None:
        if self.adapter is not None:
            self.metrics.budget_level.set(self.adapter.observe(level, seconds))

    def _budget_table(self) -> list[dict]:
        """Every budget the deployment carries: bytes per image, simulated score, which one is the default."""
        nested = self.manifest.budgets()
        return [{"budget": nested.budgets[level] if nested else None,
                 "bytes_per_image": self.manifest.expected_at(level).bytes,
                 "ratio": self.manifest.expected_at(level).ratio,
                 "reference": self.manifest.reference_at(level), "default": level == self.default_level}
                for level in range(len(nested.budgets) if nested else 1)]

    def model_card(self) -> dict:
        m, expected = self.manifest, self.manifest.expected_at(self.default_level)
        return {"model": asdict(m.model), "task": m.task, "nodes": m.nodes, "transport_dtype": m.transport_dtype,
                "input_shape": m.input_shape, "class_names": m.class_names,
                "bytes_per_image": expected.bytes, "dense_bytes_per_image": expected.dense_bytes,
                "ratio": expected.ratio, "cost_report": expected.to_json(),
                "reference": m.reference_at(self.default_level), "budgets": self.budgets,
                "serving": {"max_batch": self.options.max_batch, "max_wait_ms": self.options.max_wait_ms,
                            "queue_size": self.options.queue_size, "inflight": self.options.inflight,
                            "latency_target_ms": self.options.latency_target_ms,
                            "budget_now": self.budgets[self.level_of(None)]["budget"]}}


def current_service(request: Request) -> Service:
    """The Service of the app answering `request` (an error handler calls it; a route asks for `ServiceDep`)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(current_service)]
