"""The /v1 API: GET /v1/model (the model card: task, nodes, bytes per image, budgets, serving settings) and POST
/v1/predict (an image as the body or as a multipart file field; the task's answer as JSON, or as PNG)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from disco.serve.answers import as_json, as_png, image_pixels, read_image
from disco.serve.service import Service, ServiceDep
from disco.serve.uploads import image_bytes, read_body

PNG_TYPE = "image/png"


async def model(service: ServiceDep):
    return service.model_card()


def v1_router(default_top_k: int) -> APIRouter:
    """The /v1 routes; ?top_k= defaults to `default_top_k` (--top-k), in the route's signature so that
    /openapi.json shows it."""
    router = APIRouter()
    router.add_api_route("/v1/model", model, methods=["GET"])

    @router.post("/v1/predict")
    async def predict(service: ServiceDep, request: Request, top_k: int = Query(default_top_k, ge=1, le=1000),
                      mask: bool = Query(False, description="include masks / images as base64 PNG in the JSON"),
                      format: str = Query("json", pattern="^(json|png)$"),
                      budget: float | None = Query(None, gt=0, le=1, description="a deployment carrying several "
                                                   "nested budgets: the one to run at (GET /v1/model lists them)")):
        return await answer(service, request, top_k, mask, format, budget)

    return router


async def answer(service: Service, request: Request, top_k: int, mask: bool, format: str,
                 budget: float | None) -> Response:
    """One image through the batcher and the ranks: the task's answer (with the budget it ran at, if the
    deployment carries several), counted in the latency and images-by-budget metrics."""
    began, options = time.perf_counter(), service.options
    level = service.level_of(budget)
    body = await image_bytes(request, await read_body(request, options.max_body_bytes), options.max_body_bytes)
    pixels = await run_in_threadpool(image_pixels, body, options.max_pixels)  # its header: nothing decoded yet
    async with service.decoding.hold(pixels):
        image, read = await run_in_threadpool(read_image, body, service.manifest, options.max_pixels)
    result = await service.batcher.infer(image, top_k, level)
    ran_at = service.budgets[level]["budget"]
    service.metrics.images_by_budget.labels(budget="deployed" if ran_at is None else str(ran_at)).inc()
    service.metrics.latency.observe(time.perf_counter() - began)
    if format == "png":
        return Response(await run_in_threadpool(as_png, result), media_type=PNG_TYPE)
    budget_field = {} if ran_at is None else {"budget": ran_at}
    if mask:  # PNG encoding: off the event loop
        return JSONResponse({**await run_in_threadpool(as_json, result, read, mask), **budget_field})
    return JSONResponse({**as_json(result, read, mask), **budget_field})
