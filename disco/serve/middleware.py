"""What runs around every request: the bearer token on the protected paths (`RequireToken`), and
disco_requests_total by path and status (`CountRequests`), its path label one of the app's routes (`PathLabels`).
Plain ASGI middleware, not Starlette's BaseHTTPMiddleware: no extra task per request, and the body of an upload
passes through untouched."""
from __future__ import annotations

import hmac
from collections.abc import Iterable

from prometheus_client import Counter
from starlette.datastructures import URL, Headers
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from disco.serve.http_errors import error_response

# the page, /health and /ready answer without the token (probes, browsers); the API's description (what routes
# and parameters exist) is as protected as the API
PROTECTED = ("/v1/", "/metrics", "/openapi.json")
OTHER = "other"


def _path(scope: Scope) -> str:
    return URL(scope=scope).path  # as Request.url.path reads it


class RequireToken:
    """A request to a protected path without `Authorization: Bearer TOKEN` is refused (401, WWW-Authenticate:
    Bearer) before any route sees it, so an unknown protected path says nothing about what exists."""

    def __init__(self, app: ASGIApp, token: str, errors: Counter):
        self.app, self.expected, self.errors = app, f"Bearer {token}".encode(), errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _path(scope).startswith(PROTECTED):
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), self.expected):  # constant time: no guessing by timing
                self.errors.labels("unauthorized").inc()
                response = error_response(401, "unauthorized", "this service needs `Authorization: Bearer TOKEN`")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class PathLabels:
    """The path label of a request: the route it addresses (a route with parameters: its template), else
    "other". One label per route the app has, never one per URL a client sends: Prometheus keeps every label
    value for good, and a scanner sends endless URLs."""

    def __init__(self, routes: Iterable[BaseRoute]):
        routes = [route for route in routes if hasattr(route, "path")]
        self.paths = frozenset(route.path for route in routes if "{" not in route.path)
        self.templates = [(route.path_regex, route.path) for route in routes if "{" in route.path]

    def __call__(self, path: str) -> str:
        if path in self.paths:
            return path
        return next((template for regex, template in self.templates if regex.match(path)), OTHER)


class CountRequests:
    """disco_requests_total{path, status} of every answer, refusals included; counted as the answer starts, so a
    client that reads /metrics after its answer finds it counted."""

    def __init__(self, app: ASGIApp, requests: Counter, labels: PathLabels):
        self.app, self.requests, self.labels = app, requests, labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = self.labels(_path(scope))

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
