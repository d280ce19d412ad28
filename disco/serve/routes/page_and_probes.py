"""GET / (the page: try the deployment in a browser), GET or HEAD /health (the process is up and its ranks can still come
back) and /ready (every rank joined and verified): none needs the token (browsers, orchestrators' probes)."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from disco.serve.http_errors import error_response
from disco.serve.service import ServiceDep

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def page():
    return resources.files("disco.serve").joinpath("page.html").read_text()


# HEAD is what load balancers send; it stays out of the OpenAPI schema, where it would repeat GET's operation.
@router.get("/health")
@router.head("/health", include_in_schema=False)
async def health(service: ServiceDep):
    if service.ranks.ended:
        return error_response(503, "ranks_ended", service.ranks.reason)
    return {"status": "up"}


@router.get("/ready")
@router.head("/ready", include_in_schema=False)
async def ready(service: ServiceDep):
    if not service.ranks.ready:
        return error_response(503, "not_ready", service.ranks.reason, 1)
    return {"ready": True, "nodes": service.manifest.nodes}
