"""The channel between `disco serve`'s HTTP front end and rank 0 of the deployment: every message of it, both
sides, in one place (the ranks' own traffic is disco/runtime/comm.py's).

The front end listens on 127.0.0.1 with a random key and hands address and key to rank 0 through its
environment; multiprocessing.connection authenticates the connection with that key (HMAC challenge) and frames
messages. A message is bytes, never a pickle: a 4-byte header length, a JSON header, then tensors as safetensors.

Front end -> rank 0: {"kind": "batch", "batch": id} + {"input": [n, C, H, W] float32}; {"kind": "stop"}.
Rank 0 -> front end: {"kind": "hello", "pid", "world", "backend", "inflight"} once the ranks joined and agreed;
{"kind": "output", "batch": id} + the output's tensors "0", "1"... (pytree leaves, in order);
{"kind": "error", "batch": id or null, "message"}; {"kind": "counters", "sent": {category: [[src][dst]]}}.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
from multiprocessing.connection import Client, Connection, Listener

import safetensors.torch
import torch

from disco.errors import DiscoError

ADDRESS_ENV, KEY_ENV = "DISCO_SERVE_LINK", "DISCO_SERVE_KEY"
HEADER_BYTES = 4


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
    """The front end's side: listens on 127.0.0.1 (a port of its own), one rank 0 at a time."""

    def __init__(self, max_bytes: int):
        self.key = secrets.token_bytes(32)
        self.listener = Listener(("127.0.0.1", 0), authkey=self.key)
        self.max_bytes = max_bytes

    def environment(self) -> dict[str, str]:
        """What rank 0 needs to connect, for its process environment (not its command line: others may read that)."""
        host, port = self.listener.address
        return {ADDRESS_ENV: f"{host}:{port}", KEY_ENV: self.key.hex()}

    def accept(self) -> Link:
        """The next rank 0 that proves it holds the key (others are refused by multiprocessing's handshake)."""
        return Link(self.listener.accept(), self.max_bytes)

    def close(self) -> None:
        self.listener.close()


def connect_from_environment(max_bytes: int) -> Link:
    """Rank 0's side: connect to the front end named in this process's environment."""
    if ADDRESS_ENV not in os.environ or KEY_ENV not in os.environ:
        raise DiscoError(f"--serve: {ADDRESS_ENV} and {KEY_ENV} are unset; rank 0 is started by `disco serve`")
    host, _, port = os.environ[ADDRESS_ENV].rpartition(":")
    try:
        return Link(Client((host, int(port)), authkey=bytes.fromhex(os.environ[KEY_ENV])), max_bytes)
    except (OSError, ValueError) as error:
        raise DiscoError(f"--serve: cannot reach the front end at {os.environ[ADDRESS_ENV]}: {error}") from None
