"""The HTTP/1.1 connection of `disco serve`: uvicorn's h11 protocol with the limits a public service needs and
uvicorn does not set (its httptools protocol reads headers of any size, and neither waits less than forever for a
request that never completes):

- request headers of at most HEADER_BYTES (larger: 431);
- a request's head complete within --header-timeout seconds of the connection opening or of the previous answer
  (idle connections and clients sending a byte a second are closed; 408 when part of a head had arrived);
- its body complete within --body-timeout seconds of its head (408, the connection closed);
- malformed requests (a negative Content-Length, a bad request line) answered in the service's JSON error shape;
- on SIGTERM, a request still arriving answered 503 at once.

Each refusal is counted in disco_errors_total by its kind, as the app's own refusals are.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_BYTES = 64 * 1024  # request line and headers together; browsers and HTTP clients send a few KiB at most


@dataclass(frozen=True)
class HttpLimits:
    header_timeout_s: float
    body_timeout_s: float
    header_bytes: int = HEADER_BYTES


def bounded_protocol(limits: HttpLimits, count: Callable[[str], None]) -> Callable[..., H11Protocol]:
    """What uvicorn.Config(http=...) takes: builds one BoundedH11Protocol per connection."""
    return partial(BoundedH11Protocol, limits=limits, count=count)


def _head_bytes(request: h11.Request) -> int:
    """The request line and headers as sent (each line with its separator and CRLF)."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers)


def json_refusal(status: int, kind: str, message: str) -> bytes:
    """A whole HTTP response in the service's error shape, written straight to a connection about to close."""
    body = json.dumps({"error": {"kind": kind, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class BoundedH11Protocol(H11Protocol):
    def __init__(self, *args, limits: HttpLimits, count: Callable[[str], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.header_bytes)
        self.conn.next_event = self._keeping_the_error(self.conn.next_event)  # type: ignore[method-assign]
        self.limits, self.count = limits, count
        self.deadline: asyncio.TimerHandle | None = None
        self.protocol_error: h11.RemoteProtocolError | None = None

    def _keeping_the_error(self, next_event: Callable[[], object]) -> Callable[[], object]:
        """h11's next_event, keeping h11's own reason (and status hint) for send_400_response. h11 bounds only a
        head still incomplete: one that arrived whole is measured here, before uvicorn hands it to the app."""
        def watched() -> object:
            try:
                event = next_event()
                if isinstance(event, h11.Request) and _head_bytes(event) > self.limits.header_bytes:
                    raise h11.RemoteProtocolError("headers too large", error_status_hint=431)
                return event
            except h11.RemoteProtocolError as error:
                self.protocol_error = error
                raise
        return watched

    # -- the deadlines: one at a time, for the head and then for the body of the request being read

    def _arm(self, seconds: float, expired: Callable[[], None]) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timeout, which only an idle connection meets
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm(self.limits.header_timeout_s, self._head_too_slow)

    def handle_events(self) -> None:
        cycle = self.cycle
        try:
            super().handle_events()
        finally:
            self._follow_the_request(started=self.cycle is not cycle)

    def _follow_the_request(self, started: bool) -> None:
        """After h11 has read what arrived: a new head starts the body's deadline, a whole body ends it."""
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()
        elif started and self.conn.their_state is h11.SEND_BODY:
            self._arm(self.limits.body_timeout_s, self._body_too_slow)

    # -- refusals

    def _head_too_slow(self) -> None:
        self.deadline = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a head arrived: say why the connection closes
            self._refuse(408, "request_timeout", f"the request's headers did not arrive within "
                                                 f"{self.limits.header_timeout_s:g} s (--header-timeout)")
        else:  # an idle connection: closed without a word, as an idle keep-alive connection is
            self.transport.close()

    def _body_too_slow(self) -> None:
        self.deadline = None
        if self.cycle is None or self.cycle.response_started or self.transport.is_closing():
            return
        self._refuse(408, "request_timeout", f"the request's body did not arrive within "
                                             f"{self.limits.body_timeout_s:g} s (--body-timeout)")
        self.cycle.disconnected = True  # the app reading the body is told the client is gone; it writes nothing
        self.cycle.message_event.set()

    def shutdown(self) -> None:
        """SIGTERM: a request still arriving gets the JSON 503 now (uvicorn would wait out its graceful period
        and then cut it with a plain-text error); requests being answered finish as uvicorn lets them."""
        arriving_head = self.cycle is None and self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]
        arriving_body = (self.cycle is not None and not self.cycle.response_started
                         and self.conn.their_state is h11.SEND_BODY)
        if not (arriving_head or arriving_body) or self.transport.is_closing():
            return super().shutdown()
        self._refuse(503, "stopping", "the service is stopping: send the request again once it is back")
        if arriving_body:
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, in the service's JSON shape."""
        error, self.protocol_error = self.protocol_error, None
        status = getattr(error, "error_status_hint", 400)
        if status == 431:
            self._refuse(431, "headers_too_large", f"the request's headers pass {self.limits.header_bytes:,} bytes")
        else:
            self._refuse(status, "malformed_request", f"not a valid HTTP/1.1 request: {error or msg}")

    def _refuse(self, status: int, kind: str, message: str) -> None:
        self._disarm()
        self.count(kind)
        self.transport.write(json_refusal(status, kind, message))
        self.transport.close()
