"""The HTTP side of `disco serve` (FastAPI, run by uvicorn): `create_app` builds the app of a Service from its
parts: the error shape (http_errors.py), the bearer token and the request metrics (middleware.py), and the
routers (routes/: the page and probes, the /v1 API, /metrics). Another API is one more router here."""
from __future__ import annotations

from fastapi import FastAPI

from disco.serve.http_errors import install_error_handlers
from disco.serve.middleware import CountRequests, PathLabels, RequireToken
from disco.serve.routes import page_and_probes, prometheus
from disco.serve.routes.v1 import v1_router
from disco.serve.service import Service


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="DISCO", description="A DISCO deployment served over HTTP", lifespan=service.lifespan,
                  docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN: not offline
    app.state.service = service  # what the routes and error handlers answer from (service.current_service)
    install_error_handlers(app)
    routers = [page_and_probes.router, v1_router(service.options.top_k), prometheus.router]
    for router in routers:
        app.include_router(router)
    if service.options.token:
        app.add_middleware(RequireToken, token=service.options.token, errors=service.metrics.errors)
    # labels from the routes registered above: the app's own (/openapi.json) and the routers' (FastAPI may keep an
    # included router as one entry of app.routes, without its routes' paths)
    labels = PathLabels([*app.routes, *(route for router in routers for route in router.routes)])
    # added last, so it runs first: every answer is counted, the token's refusals included
    app.add_middleware(CountRequests, requests=service.metrics.requests, labels=labels)
    return app
