"""The HTTP side of `disco serve` (FastAPI, run by uvicorn): routes, the bearer token, request size limits, one
JSON error shape ({"error": {"kind", "message"}}) for every refusal, and the metrics of each answer.

GET / (the page), /health (the process is up and its ranks can still come back), /ready (every rank joined and
verified), /v1/model, /metrics; POST /v1/predict (an image as the body or as a multipart file field).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import time
from dataclasses import asdict
from importlib import resources

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from disco.errors import DiscoError
from disco.export.manifest import Manifest
from disco.export.trust import build_deployed_model
from disco.serve.adapt import BudgetAdapter
from disco.serve.answers import as_json, as_png, read_image, task_answers, warm_up
from disco.serve.batching import Batcher, Refused
from disco.serve.metrics import ServiceMetrics
from disco.serve.options import ServeOptions
from disco.serve.ranks import Ranks
from disco.tasks.registry import get_task

PROTECTED = ("/v1/", "/metrics")  # the page, /health and /ready answer without the token (probes, browsers)
PNG_TYPE = "image/png"


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
        self.ranks = Ranks(options, self.manifest.nodes, self.metrics, quiet=quiet)
        # detection answers are decoded on this side (anchors, NMS: weight-free parts of the model)
        self.detector = build_deployed_model(self.manifest.model, options.model_code).eval() \
            if self.task.decodes_with_model else None
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
                 "bytes_per_image": self.manifest.expected_at(level)["bytes"],
                 "ratio": self.manifest.expected_at(level).get("ratio"),
                 "reference": self.manifest.reference_at(level), "default": level == self.default_level}
                for level in range(len(nested.budgets) if nested else 1)]

    def model_card(self) -> dict:
        m, expected = self.manifest, self.manifest.expected_at(self.default_level)
        return {"model": asdict(m.model), "task": m.task, "nodes": m.nodes, "transport_dtype": m.transport_dtype,
                "input_shape": m.input_shape, "class_names": m.class_names,
                "bytes_per_image": expected["bytes"], "dense_bytes_per_image": expected.get("dense_bytes"),
                "ratio": expected.get("ratio"), "cost_report": expected,
                "reference": m.reference_at(self.default_level), "budgets": self.budgets,
                "serving": {"max_batch": self.options.max_batch, "max_wait_ms": self.options.max_wait_ms,
                            "queue_size": self.options.queue_size, "inflight": self.options.inflight,
                            "latency_target_ms": self.options.latency_target_ms,
                            "budget_now": self.budgets[self.level_of(None)]["budget"]}}


def _error(status: int, kind: str, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, "too_large", f"the body is {int(declared):,} bytes; at most {limit:,} are accepted "
                      "(--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, "too_large", f"the body passed {limit:,} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request: Request, body: bytes, limit: int) -> bytes:
    """The image: the body itself, or the first file of a multipart form (field name free)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=8, max_part_size=limit)
    files = [value for value in form.values() if hasattr(value, "read")]
    if not files:
        raise Refused(400, "no_file", "the multipart form holds no file: send the image as a file field")
    return await files[0].read()


def create_app(service: Service) -> FastAPI:
    options = service.options
    app = FastAPI(title="DISCO", description="A DISCO deployment served over HTTP", lifespan=service.lifespan,
                  docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN: not offline

    @app.exception_handler(Refused)
    async def refused(request: Request, error: Refused):
        service.metrics.errors.labels(error.kind).inc()
        return _error(error.status, error.kind, str(error), error.retry_after)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        service.metrics.errors.labels(kind).inc()
        return _error(error.status_code, kind, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        service.metrics.errors.labels("invalid_request").inc()
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return _error(422, "invalid_request", where)

    @app.middleware("http")
    async def guard_and_count(request: Request, call_next):
        path = request.url.path
        known = path if path in KNOWN_PATHS else "other"  # a label per path the service has, not per URL sent
        if options.token and path.startswith(PROTECTED):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {options.token}".encode()):
                service.metrics.errors.labels("unauthorized").inc()
                response = _error(401, "unauthorized", "this service needs `Authorization: Bearer TOKEN`")
                response.headers["WWW-Authenticate"] = "Bearer"
                service.metrics.requests.labels(known, "401").inc()
                return response
        response = await call_next(request)
        service.metrics.requests.labels(known, str(response.status_code)).inc()
        return response

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("disco.serve").joinpath("page.html").read_text()

    @app.get("/health")
    async def health():
        if service.ranks.ended:
            return _error(503, "ranks_ended", service.ranks.reason)
        return {"status": "up"}

    @app.get("/ready")
    async def ready():
        if not service.ranks.ready:
            return _error(503, "not_ready", service.ranks.reason, 1)
        return {"ready": True, "nodes": service.manifest.nodes}

    @app.get("/v1/model")
    async def model():
        return service.model_card()

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/predict")
    async def predict(request: Request, top_k: int = Query(options.top_k, ge=1, le=1000),
                      mask: bool = Query(False, description="include masks / images as base64 PNG in the JSON"),
                      format: str = Query("json", pattern="^(json|png)$"),
                      budget: float | None = Query(None, gt=0, le=1, description="a deployment carrying several "
                                                   "nested budgets: the one to run at (GET /v1/model lists them)")):
        began = time.perf_counter()
        level = service.level_of(budget)
        body = await _body(request, options.max_body_bytes)
        image, read = await run_in_threadpool(read_image, await _image_bytes(request, body, options.max_body_bytes),
                                              service.manifest, options.max_pixels)
        answer = await service.batcher.infer(image, top_k, level)
        budget = service.budgets[level]["budget"]
        service.metrics.images_by_budget.labels(budget="deployed" if budget is None else str(budget)).inc()
        service.metrics.latency.observe(time.perf_counter() - began)
        if format == "png":
            return Response(await run_in_threadpool(as_png, answer), media_type=PNG_TYPE)
        ran_at = {} if budget is None else {"budget": budget}
        if mask:  # PNG encoding: off the event loop
            return JSONResponse({**await run_in_threadpool(as_json, answer, read, mask), **ran_at})
        return JSONResponse({**as_json(answer, read, mask), **ran_at})

    KNOWN_PATHS = {route.path for route in app.routes}
    return app
