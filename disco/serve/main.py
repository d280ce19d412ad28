"""Start `disco serve`: check the deployment, then run the app under uvicorn until interrupted."""
from __future__ import annotations

import contextlib
import ctypes
import resource
import signal
import socket
import sys

import uvicorn

from disco.errors import DiscoError
from disco.export.signing import verify_deployment
from disco.export.trust import model_to_build
from disco.serve.app import create_app
from disco.serve.http_protocol import HttpLimits, bounded_protocol
from disco.serve.options import ServeOptions
from disco.serve.service import Service


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bound before any rank starts, so that a port in use is one clear error and nothing is left running."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # connections inherit it: a response's headers and body are written apart, and with Nagle's algorithm the body
    # waits for the client's delayed ACK of the headers (measured: 44 ms per request instead of 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise DiscoError(f"cannot listen on {host}:{port}: {error.strerror} (choose another --port)") from None
    return sock


class _Terminated(Exception):
    """SIGTERM, raised again by uvicorn once it has answered the requests in flight and stopped the ranks."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _allow_many_connections() -> None:
    """Every connection is a file descriptor: the soft limit (often 1,024) raised to the hard one, so that a
    crowd of idle connections (closed after --header-timeout) cannot stop the service accepting more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def _give_back_decoded_images() -> None:
    """Decoded images (PIL's 16 MiB blocks, numpy arrays) in memory of their own that is returned to the system
    when they are freed. glibc otherwise raises its mmap threshold after the first such free and serves the next
    image from a thread's heap, which keeps it: the front end's memory would grow to the largest images each of
    its decoding threads ever saw, not to the --max-decode-pixels it decodes at once."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator has its own policy
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)


def serve(options: ServeOptions) -> int:
    if options.verify_key is not None:  # refused here, once, before any rank starts
        verify_deployment(options.deploy, options.verify_key)
    service = Service(options)
    model_to_build(service.manifest.model, options.model_code)  # a model file is hashed, never imported, here
    sock = _listening_socket(options.host, options.port)
    _allow_many_connections()
    _give_back_decoded_images()
    where = f"http://{options.host}:{options.port}"
    print(f"disco serve: {options.deploy} ({service.manifest.task}, {service.manifest.nodes} nodes) on {where} "
          f"(/ to try it, /v1/predict, /metrics){' with a bearer token' if options.token else ''}; starting the "
          "ranks", file=sys.stderr, flush=True)
    limits = HttpLimits(header_timeout_s=options.header_timeout, body_timeout_s=options.body_timeout)
    count = lambda kind: service.metrics.errors.labels(kind).inc()  # noqa: E731
    config = uvicorn.Config(create_app(service), host=options.host, port=options.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=10, http=bounded_protocol(limits, count))
    server = uvicorn.Server(config)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # uvicorn restores it before raising SIGTERM again
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):  # uvicorn raises the signal again once it has shut down: a stop
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("disco serve: stopped", file=sys.stderr, flush=True)
    return 0 if server.started else 1
