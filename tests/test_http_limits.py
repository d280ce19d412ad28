"""The HTTP server's own limits (disco/serve/http_protocol.py), on a real uvicorn server and raw sockets, with the
app of `disco serve` in front of a stand-in service: header size, slow and idle clients, slow bodies, malformed
requests, each answered in the service's JSON error shape (or, for an idle connection, closed) and counted."""
from __future__ import annotations

import contextlib
import json
import resource
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from disco.serve.app import create_app
from disco.serve.http_protocol import HEADER_BYTES, HttpLimits, bounded_protocol
from runtime_helpers import free_port
from serve_helpers import stub_service

HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 1.5, 1.5


@contextlib.contextmanager
def _running(service):
    """`create_app(service)` under uvicorn with the service's HTTP limits, in a thread; (port, server)."""
    port = free_port()
    count = lambda kind: service.metrics.errors.labels(kind).inc()  # noqa: E731
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            http=bounded_protocol(HttpLimits(HEADER_TIMEOUT_S, BODY_TIMEOUT_S), count))
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    while not uvicorn_server.started:
        time.sleep(0.05)
    try:
        yield port, uvicorn_server
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server():
    service = stub_service()
    with _running(service) as (port, _):
        yield port, service


def _errors(service, kind: str) -> float:
    return service.metrics.errors.labels(kind)._value.get()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _answer(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the one response the server sends before it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_headers_past_the_limit_are_refused_431(server):
    port, service = server
    with _connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (HEADER_BYTES + 1) + b"\r\n\r\n")
        status, body = _answer(sock)
    assert (status, body["error"]["kind"]) == (431, "headers_too_large")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:  # a large but allowed header is fine
        assert client.get("/health", headers={"X-Big": "a" * (HEADER_BYTES // 2)}).status_code == 200


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
])
def test_malformed_requests_get_json_400(server, request_bytes):
    port, service = server
    before = _errors(service, "malformed_request")
    with _connect(port) as sock:
        sock.sendall(request_bytes)
        status, body = _answer(sock)
    assert (status, body["error"]["kind"]) == (400, "malformed_request")
    assert _errors(service, "malformed_request") == before + 1


def test_an_unknown_method_gets_json(server):
    port, _ = server
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        answer = client.request("FOO", "/v1/predict")
    assert (answer.status_code, answer.json()["error"]["kind"]) == (405, "method_not_allowed")


def test_an_idle_connection_is_closed_after_the_header_timeout(server):
    port, _ = server
    with _connect(port) as sock:
        began = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, without a response
        assert HEADER_TIMEOUT_S - 0.2 < time.monotonic() - began < HEADER_TIMEOUT_S + 3


def test_a_client_that_sends_its_headers_slowly_gets_408(server):
    port, service = server
    before = _errors(service, "request_timeout")
    with _connect(port) as sock:
        began = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":  # a byte every 0.1 s: never done in time
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        status, body = _answer(sock)
    assert (status, body["error"]["kind"]) == (408, "request_timeout")
    assert time.monotonic() - began < HEADER_TIMEOUT_S + 3
    assert _errors(service, "request_timeout") == before + 1


def test_a_body_shorter_than_its_content_length_gets_408(server):
    port, service = server
    with _connect(port) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
        status, body = _answer(sock)
    assert (status, body["error"]["kind"]) == (408, "request_timeout")
    assert "--body-timeout" in body["error"]["message"]


def test_keep_alive_requests_each_get_the_header_timeout_afresh(server):
    port, _ = server
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(3):  # three requests on one connection, spread over more than one header timeout
            assert client.get("/health").status_code == 200
            time.sleep(HEADER_TIMEOUT_S / 2)


def test_a_crowd_of_slow_and_idle_clients_neither_stops_a_normal_one_nor_stays(server):
    """1,000 idle connections and 100 clients sending a byte at a time: a normal client is answered meanwhile,
    and every one of the crowd is closed by the server within the header timeout (and a margin)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the crowd needs 2 x 1,100 file descriptors; this process may have {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port, _ = server
    idle = [_connect(port) for _ in range(1000)]
    slow = [_connect(port) for _ in range(100)]
    began = time.monotonic()
    try:
        for sock in slow:
            sock.sendall(b"G")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            answer = client.get("/health")
            assert answer.status_code == 200  # served while the whole crowd is connected
        assert time.monotonic() - began < HEADER_TIMEOUT_S  # ...and before any of it was dropped
        for sock in idle:
            sock.settimeout(max(0.1, began + HEADER_TIMEOUT_S + 5 - time.monotonic()))
            assert sock.recv(65536) == b""  # closed without a word
        for sock in slow:
            sock.settimeout(max(0.1, began + HEADER_TIMEOUT_S + 5 - time.monotonic()))
            assert _answer(sock)[0] == 408  # told why, then closed
    finally:
        for sock in idle + slow:
            sock.close()


def test_a_request_still_arriving_at_shutdown_gets_503_at_once():
    with _running(stub_service()) as (port, uvicorn_server):
        uploading = _connect(port)
        uploading.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        time.sleep(0.3)
        began = time.monotonic()
        uvicorn_server.should_exit = True  # what SIGTERM does
        status, body = _answer(uploading)
        assert (status, body["error"]["kind"]) == (503, "stopping")
        assert time.monotonic() - began < BODY_TIMEOUT_S  # not the body timeout: the shutdown answered it
        uploading.close()
