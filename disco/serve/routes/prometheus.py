"""GET /metrics: the service's Prometheus registry (metrics.py) in the text exposition format."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from disco.serve.service import ServiceDep

EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"

router = APIRouter()


@router.get("/metrics")
async def metrics(service: ServiceDep):
    return Response(service.metrics.exposition(), media_type=EXPOSITION_TYPE)
