"""A closed-loop HTTP load generator for bench/serve.py: N clients, each on one keep-alive connection, sending its
next POST when the last one is answered, all in one asyncio loop of one thread.

Hand-written over asyncio streams because the client must cost far less CPU than the service it measures on
the same 2 cores: 32 threads of httpx used 1.7 cores (measured) and starved the service. It speaks only what it
sends: HTTP/1.1 requests with a Content-Length, responses with a Content-Length (as uvicorn answers)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


@dataclass
class Record:
    started: float
    seconds: float
    status: int  # 0: no answer within the timeout (hung) or the connection failed
    request: int  # which of the requests it was
    body: bytes = b""


@dataclass
class Load:
    records: list[Record] = field(default_factory=list)
    seconds: float = 0.0


def request_bytes(host: str, path: str, body: bytes, content_type: str = "image/png") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes,
                                                                                                             bool]:
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and value.strip().lower() == "close":
            close = True
    return status, await reader.readexactly(length), close


async def _client(host: str, port: int, requests: list[bytes], first: int, stop_at: float, budget: list[int],
                  timeout: float, load: Load) -> None:
    connection = None
    index = first
    while time.monotonic() < stop_at and budget[0] > 0:
        budget[0] -= 1
        which = index % len(requests)
        request = requests[which]
        index += 1
        began = time.perf_counter()
        try:
            if connection is None:
                connection = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            status, body, close = await asyncio.wait_for(_exchange(*connection, request), timeout)
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            load.records.append(Record(began, time.perf_counter() - began, 0, which))
            if connection is not None:
                connection[1].close()
            connection = None
            continue
        load.records.append(Record(began, time.perf_counter() - began, status, which, body))
        if close:
            connection[1].close()
            connection = None
        if status == 503:
            await asyncio.sleep(0.1)  # as a client honouring Retry-After would, a little sooner
    if connection is not None:
        connection[1].close()


def run_load(host: str, port: int, requests: list[bytes], clients: int, seconds: float, max_requests: int,
             timeout: float = 60.0) -> Load:
    """`clients` closed-loop clients for at most `seconds` and `max_requests` requests in all."""
    async def main() -> Load:
        load, budget = Load(), [max_requests]
        stop_at, began = time.monotonic() + seconds, time.perf_counter()
        await asyncio.gather(*(_client(host, port, requests, 7 * k, stop_at, budget, timeout, load)
                               for k in range(clients)))
        load.seconds = time.perf_counter() - began
        return load

    return asyncio.run(main())


def top_answer(record: Record) -> tuple[int, float] | None:
    """The top class and its probability of a 200 classification answer."""
    if record.status != 200:
        return None
    top = json.loads(record.body)["top"][0]
    return top["class"], top["probability"]
