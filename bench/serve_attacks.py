"""`disco serve` under hostile connections (issue 30's must-hold targets), on a real 2-node service:

1. the HTTP side: a normal client's latency (GET /health and POST /v1/predict, medians of 40) alone, then while
   100 clients send a request head a byte at a time and 1,000 connections stay idle; how long until the server
   has closed every one of them (--header-timeout, at its default of 10 s);
2. the rank link: 100 connect-and-close and 10 silent connections to the address rank 0 reaches the front end
   at, then rank 1 SIGKILLed: seconds until /ready is 200 again (target: under 10 s), beside the same without
   the attack.
Writes docs/results/serve_attacks.{md,json}. Re-run:
    .venv/bin/python bench/serve_attacks.py      # about 2 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import serve as serve_bench  # noqa: E402  (bench/serve.py: the service process)
import serve_memory  # noqa: E402  (bench/serve_memory.py: the small 2-node deployment)
from disco.serve import client  # noqa: E402

RESULTS = ROOT / "docs" / "results"
HEADER_TIMEOUT_S = 10.0  # the default
SLOW, IDLE, SAMPLES = 100, 1000, 40


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def latencies(url: str, image: bytes) -> dict[str, float]:
    """Median milliseconds of a fresh client's GET /health and POST /v1/predict."""
    timings: dict[str, list[float]] = {"health": [], "predict": []}
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(SAMPLES):
            for route, call in (("health", lambda: http.get("/health")),
                                ("predict", lambda: http.post("/v1/predict", content=image))):
                began = time.perf_counter()
                assert call().status_code == 200
                timings[route].append((time.perf_counter() - began) * 1000)
    return {route: round(statistics.median(values), 2) for route, values in timings.items()}


def crowd(port: int) -> tuple[list[socket.socket], list[socket.socket]]:
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(SLOW)]
    for sock in slow:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
    return idle, slow


def seconds_until_closed(sockets: list[socket.socket], began: float, limit: float = 60) -> float:
    for sock in sockets:
        sock.settimeout(max(0.1, began + limit - time.monotonic()))
        while sock.recv(65536):
            pass
        sock.close()
    return round(time.monotonic() - began, 2)


def http_side(folder: Path, image: bytes) -> dict:
    port = serve_memory._free_port()
    service = serve_bench.Service(folder, port, "--header-timeout", str(HEADER_TIMEOUT_S))
    try:
        service.wait_ready()
        alone = latencies(service.url, image)
        began = time.monotonic()
        idle, slow = crowd(port)
        crowded = latencies(service.url, image)
        during = round(time.monotonic() - began, 2)
        closed = seconds_until_closed(idle + slow, began)
        return {"alone_ms": alone, "with_crowd_ms": crowded, "crowd_connected_s": during,
                "all_closed_after_s": closed, "header_timeout_s": HEADER_TIMEOUT_S}
    finally:
        service.stop()


def _link_address(rank0: int) -> tuple[str, int]:
    environ = Path(f"/proc/{rank0}/environ").read_bytes().split(b"\0")
    value = next(entry for entry in environ if entry.startswith(b"DISCO_SERVE_LINK="))
    host, _, port = value.split(b"=", 1)[1].decode().rpartition(":")
    return host, int(port)


def recovery(service: serve_bench.Service, attack: bool) -> dict:
    ranks = service.ranks()
    silent = []
    if attack:
        address = _link_address(ranks[0])
        for _ in range(100):
            socket.create_connection(address).close()
        silent = [socket.create_connection(address) for _ in range(10)]
    began = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    while client.status_of(f"{service.url}/ready") == 200 and time.monotonic() - began < 30:
        time.sleep(0.05)  # until the service has noticed
    ready = client.wait_ready(service.url, service.process, timeout=120)
    for sock in silent:
        sock.close()
    return {"attack": attack, "ready_again_s": round(time.monotonic() - began, 2), "not_ready_for_s": round(ready, 2)}


def link_side(folder: Path) -> list[dict]:
    service = serve_bench.Service(folder, serve_memory._free_port(), "--restarts", "2", "--timeout", "5")
    try:
        service.wait_ready()
        return [recovery(service, attack=False), recovery(service, attack=True)]
    finally:
        service.stop()


def render(http: dict, link: list[dict]) -> str:
    lines = ["# `disco serve` under hostile connections", "",
             f"2-node mobilenet_v2 (64x64) deployment on loopback. A fresh client's median latency of {SAMPLES} "
             f"requests, alone and while {SLOW} clients send a head a byte at a time and {IDLE} connections "
             f"stay idle (--header-timeout {HEADER_TIMEOUT_S:g} s):", "",
             "| route | alone (ms) | with the crowd (ms) |", "|---|---|---|"]
    for route in http["alone_ms"]:
        lines.append(f"| {route} | {http['alone_ms'][route]} | {http['with_crowd_ms'][route]} |")
    lines += ["", f"Every crowd connection closed by the server {http['all_closed_after_s']} s after it opened "
                  f"(the timeout is {HEADER_TIMEOUT_S:g} s; the crowd took {http['crowd_connected_s']} s to connect "
                  "and be measured beside).", "",
              "Rank 1 SIGKILLed; seconds until /ready answered 200 again (torchrun restarts the group):", "",
              "| before the kill | ready again after (s) |", "|---|---|"]
    for row in link:
        what = "100 connect-and-close + 10 silent link connections" if row["attack"] else "nothing"
        lines.append(f"| {what} | {row['ready_again_s']} |")
    lines += ["", "Re-run: `.venv/bin/python bench/serve_attacks.py`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    for folder in (serve_memory.WORK, serve_bench.WORK):
        folder.mkdir(parents=True, exist_ok=True)
    folder = serve_memory.deployment()
    http, link = http_side(folder, _png()), link_side(folder)
    RESULTS.joinpath("serve_attacks.json").write_text(json.dumps({"http": http, "link": link}, indent=1) + "\n")
    RESULTS.joinpath("serve_attacks.md").write_text(render(http, link))
    print(render(http, link))


if __name__ == "__main__":
    main()
