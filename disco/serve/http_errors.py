"""One JSON shape for every refusal, {"error": {"kind", "message"}} (and `Retry-After` when trying again later
can help), and the handlers that give it to refusals, HTTP errors (404, 405) and invalid requests, each counted
in disco_errors_total by its kind."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from disco.serve.batching import Refused
from disco.serve.service import current_service

HTTP_KINDS = {404: "not_found", 405: "method_not_allowed"}  # any other HTTP error: "http_error"


def error_response(status: int, kind: str, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)


def _counted(request: Request, kind: str) -> None:
    current_service(request).metrics.errors.labels(kind).inc()


async def refused(request: Request, error: Refused) -> JSONResponse:
    _counted(request, error.kind)
    return error_response(error.status, error.kind, str(error), error.retry_after)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    kind = HTTP_KINDS.get(error.status_code, "http_error")
    _counted(request, kind)
    return error_response(error.status_code, kind, str(error.detail))


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    _counted(request, "invalid_request")
    where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return error_response(422, "invalid_request", where)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Refused, refused)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
