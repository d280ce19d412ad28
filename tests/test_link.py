"""The link between `disco serve`'s front end and rank 0 (disco/runtime/link.py) as any local process can reach
it: connections that close at once, say nothing, send garbage or hold the wrong key never stop it, and rank 0
with the key always gets through and talks. Reference: a real multiprocessing client with the key."""
from __future__ import annotations

import socket
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
import torch

from disco.runtime.link import HANDSHAKE_TIMEOUT_S, Link, LinkListener


def _address(listener: LinkListener) -> tuple[str, int]:
    host, _, port = listener.environment()["DISCO_SERVE_LINK"].rpartition(":")
    return host, int(port)


def _accept_in_background(listener: LinkListener) -> tuple[threading.Thread, list]:
    accepted: list = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    return thread, accepted


def test_hostile_local_connections_do_not_stop_rank_0_getting_through():
    listener = LinkListener(max_bytes=1 << 20)
    address = _address(listener)
    try:
        for _ in range(100):  # connect and close: once stopped the accept loop for good
            socket.create_connection(address).close()
        silent = [socket.create_connection(address) for _ in range(10)]  # held open, saying nothing
        garbage = socket.create_connection(address)
        garbage.sendall(b"\x00\x00\x00\x10not a handshake!" * 4)
        with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
            Client(address, authkey=b"not the key").close()
        thread, accepted = _accept_in_background(listener)
        rank0 = Client(address, authkey=listener.key)  # while the silent ones are still open
        thread.join(HANDSHAKE_TIMEOUT_S - 1)
        assert accepted, "rank 0 was not accepted while silent connections were open"
        front = accepted[0]
        Link(rank0, 1 << 20).send({"kind": "hello"}, {"x": torch.arange(3.0)})
        header, tensors = front.receive(timeout=5)
        assert header == {"kind": "hello"} and torch.equal(tensors["x"], torch.arange(3.0))
        for connection in silent:  # each was challenged in its own handshake, none was let through
            connection.settimeout(5)
            assert b"#CHALLENGE#" in connection.recv(64)  # (after its 4-byte frame length)
            connection.close()
        garbage.close()
        rank0.close()
    finally:
        listener.close()
    with pytest.raises(OSError):
        listener.accept()


def test_a_silent_connection_is_dropped_after_the_handshake_timeout():
    listener = LinkListener(max_bytes=1 << 20)
    try:
        silent = socket.create_connection(_address(listener))
        silent.settimeout(HANDSHAKE_TIMEOUT_S + 10)
        assert b"#CHALLENGE#" in silent.recv(64)
        assert silent.recv(64) == b""  # the front end closed it: it never answered the challenge
        silent.close()
    finally:
        listener.close()


def test_ranks_that_loaded_another_export_of_the_folder_are_stopped_not_served(tmp_path):
    """The folder exported again while served, then a rank restart: the new ranks' hello names another deployment
    than the one the service describes (/v1/model), so they are told to stop and the service says why."""
    from disco.serve.metrics import ServiceMetrics
    from disco.serve.options import ServeOptions
    from disco.serve.ranks import Ranks

    ranks = Ranks(ServeOptions(deploy=str(tmp_path)), 2, ServiceMetrics(), deployment="the served one", quiet=True)
    threading.Thread(target=ranks._accept_forever, daemon=True).start()
    try:
        for loaded, ready in (("a new export", False), ("the served one", True)):
            rank0 = Link(Client(_address(ranks.listener), authkey=ranks.listener.key), 1 << 20)
            rank0.send({"kind": "hello", "world": 2, "backend": "gloo", "deployment": loaded})
            if ready:
                deadline = time.monotonic() + 10
                while not ranks.ready and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert ranks.ready
            else:
                assert rank0.receive(timeout=10)[0] == {"kind": "stop"}
                assert not ranks.ready and "changed while it was served" in ranks.reason
            rank0.close()
    finally:
        ranks.stopping = True
        ranks.listener.close()
