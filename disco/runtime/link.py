"""The channel between `disco serve`'s HTTP front end and rank 0 of the deployment: every message of it, both
sides, in one place (the ranks' own traffic is disco/runtime/comm.py's).

The front end listens on 127.0.0.1 with a random key and hands address and key to rank 0 through its
environment; multiprocessing.connection authenticates the connection with that key (HMAC challenge) and frames
messages. A message is bytes, never a pickle: a 4-byte header length, a JSON header, then tensors as safetensors.

Front end -> rank 0: {"kind": "batch", "batch": id} + {"input": [n, C, H, W] float32}; {"kind": "stop"}.
Rank 0 -> front end: {"kind": "hello", "pid", "world", "backend", "inflight", "deployment"} once the ranks joined
and agreed ("deployment": Manifest.identity() of what they loaded);
{"kind": "output", "batch": id} + the output's tensors "0", "1"... (pytree leaves, in order);
{"kind": "error", "batch": id or null, "message"}; {"kind": "counters", "sent": {category: [[src][dst]]}}.
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import socket
import struct
import threading
import time
from multiprocessing.connection import Client, Connection, Listener, answer_challenge, deliver_challenge

import safetensors.torch
import torch

from disco.errors import DiscoError

ADDRESS_ENV, KEY_ENV = "DISCO_SERVE_LINK", "DISCO_SERVE_KEY"
HEADER_BYTES = 4
HANDSHAKE_TIMEOUT_S = 5.0  # a peer that has not proved the key by then is dropped
MAX_HANDSHAKES = 32  # connections proving the key at once


class LinkClosed(DiscoError):
    """The other side of the link went away (rank 0 died, or the front end stopped)."""


def encode(header: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    head = json.dumps(header).encode()
    body = safetensors.torch.save({k: t.contiguous() for k, t in tensors.items()}) if tensors else b""
    return len(head).to_bytes(HEADER_BYTES, "big") + head + body


def decode(message: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    size = int.from_bytes(message[:HEADER_BYTES], "big")
    if size > len(message) - HEADER_BYTES:
        raise DiscoError("malformed link message: header longer than the message")
    header = json.loads(message[HEADER_BYTES:HEADER_BYTES + size])
    body = message[HEADER_BYTES + size:]
    return header, (safetensors.torch.load(body) if body else {})


class Link:
    """One connected end: send and receive whole messages (thread-safe sends; one reader)."""

    def __init__(self, connection: Connection, max_bytes: int):
        self.connection, self.max_bytes = connection, max_bytes
        self._send_lock = threading.Lock()  # rank 0's lanes reply from their own threads

    def send(self, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        message = encode(header, tensors)
        try:
            with self._send_lock:
                self.connection.send_bytes(message)
        except (OSError, ValueError) as error:
            raise LinkClosed(f"the link is closed ({error})") from None

    def receive(self, timeout: float | None = None) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """The next message; None when `timeout` seconds pass without one."""
        try:
            if timeout is not None and not self.connection.poll(timeout):
                return None
            return decode(self.connection.recv_bytes(self.max_bytes))
        except (EOFError, OSError) as error:
            raise LinkClosed(f"the link is closed ({type(error).__name__})") from None

    def close(self) -> None:
        self.connection.close()


class LinkListener:
    """The front end's side: listens on 127.0.0.1 (a port of its own) for rank 0.

    Any local process can connect; only one holding the key gets through. Each connection proves it in its own
    thread within HANDSHAKE_TIMEOUT_S, at most MAX_HANDSHAKES at once (more are closed at once), so a peer that
    connects and closes, or connects and says nothing, never stops the accept loop or delays a real rank 0."""

    def __init__(self, max_bytes: int):
        self.key = secrets.token_bytes(32)
        self.listener = Listener(("127.0.0.1", 0), backlog=64)  # no authkey: _authenticate runs the handshake
        self.max_bytes = max_bytes
        self._verified: queue.Queue[Connection | None] = queue.Queue()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._closed = False
        threading.Thread(target=self._accept_forever, daemon=True, name="disco-link-accept").start()

    def environment(self) -> dict[str, str]:
        """What rank 0 needs to connect, for its process environment (not its command line: others may read that)."""
        host, port = self.listener.address
        return {ADDRESS_ENV: f"{host}:{port}", KEY_ENV: self.key.hex()}

    def accept(self) -> Link:
        """The next connection that proved it holds the key; OSError once the listener is closed."""
        connection = self._verified.get()
        if connection is None:
            self._verified.put(None)  # every later accept() sees the close too
            raise OSError("the link listener is closed")
        return Link(connection, self.max_bytes)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self._verified.put(None)

    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                connection = self.listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # e.g. out of file descriptors for a moment: keep listening
                continue
            if not self._handshakes.acquire(blocking=False):
                connection.close()  # a flood of connections: refused, the ones in progress go on
                continue
            threading.Thread(target=self._authenticate, args=(connection,), daemon=True,
                             name="disco-link-handshake").start()

    def _authenticate(self, connection: Connection) -> None:
        try:
            _receive_timeout(connection, HANDSHAKE_TIMEOUT_S)
            deliver_challenge(connection, self.key)  # as Listener(authkey=...) does, but off the accept loop
            answer_challenge(connection, self.key)
            _receive_timeout(connection, 0)
            self._verified.put(connection)
        except Exception:  # noqa: BLE001 - a wrong key, a closed or silent peer, garbage: drop that connection
            connection.close()
        finally:
            self._handshakes.release()


def _receive_timeout(connection: Connection, seconds: float) -> None:
    """Reads on the connection fail after `seconds` without data (0: wait forever)."""
    sock = socket.socket(fileno=connection.fileno())
    try:
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", whole, int((seconds - whole) * 1e6)))
    finally:
        sock.detach()  # the descriptor stays the connection's


def connect_from_environment(max_bytes: int) -> Link:
    """Rank 0's side: connect to the front end named in this process's environment."""
    if ADDRESS_ENV not in os.environ or KEY_ENV not in os.environ:
        raise DiscoError(f"--serve: {ADDRESS_ENV} and {KEY_ENV} are unset; rank 0 is started by `disco serve`")
    host, _, port = os.environ[ADDRESS_ENV].rpartition(":")
    try:
        return Link(Client((host, int(port)), authkey=bytes.fromhex(os.environ[KEY_ENV])), max_bytes)
    except (OSError, ValueError) as error:
        raise DiscoError(f"--serve: cannot reach the front end at {os.environ[ADDRESS_ENV]}: {error}") from None
