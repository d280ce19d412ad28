"""Options of `disco serve`, stated once here (the command line is derived from these fields: disco/fields.py);
the options it shares with `disco run` are RunOptions' own."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from disco.errors import DiscoError
from disco.fields import option, option_of
from disco.runtime.options import MAX_INFLIGHT, RunOptions, check_budget

TOKEN_ENV = "DISCO_SERVE_TOKEN"
TOKEN = re.compile(r"[!-~]{8,512}")  # printable ASCII, no spaces: a header carries it as it is
MiB = 1 << 20


@dataclass(kw_only=True)
class ServeOptions:
    deploy: str = option_of(RunOptions, "deploy")
    host: str = option("127.0.0.1", help="address to listen on; 0.0.0.0 exposes the service to the network (use "
                                         "--token then)")
    port: int = option(8000, help="HTTP port")
    max_batch: int = option(16, help="requests run together as one batch, at most")
    max_wait_ms: float = option(5.0, help="how long the first request of a batch waits for others to join it")
    queue_size: int = option(64, help="requests waiting for a batch, at most; more get 503 with Retry-After")
    max_body_mb: float = option(10.0, help="largest request body accepted, in MiB (larger: 413)")
    max_pixels: int = option(40_000_000, help="largest image accepted, in pixels, checked before it is decoded")
    header_timeout: float = option(10.0, metavar="S", help="seconds a client has to send a request's headers, "
                                   "from opening the connection or from the previous answer; idle and slower "
                                   "connections are closed (408 when part of the headers had come)")
    body_timeout: float = option(60.0, metavar="S", help="seconds a client has to send a request's body once its "
                                 "headers came (slower: 408, the connection closed)")
    max_decode_pixels: int | None = option(None, help="pixels decoded at once across all requests (default: "
                                           "--max-pixels, one largest image at a time); the front end's memory "
                                           "grows by up to 12 bytes per pixel while it decodes (README)")
    top_k: int = option(5, help="classes a classification answer lists, unless the request asks ?top_k=")
    token: str | None = option(None, help=f"require `Authorization: Bearer TOKEN` on /v1/* and /metrics (default: "
                                          f"${TOKEN_ENV} when set; none otherwise)")
    restarts: int = option(0, metavar="K", help="restart the ranks (all of them, torchrun's elastic restarts) up to "
                                                "K times after one dies or hangs; HTTP stays up meanwhile")
    timeout: float = option(10.0, help="seconds to wait for a peer rank before the batch fails with an error "
                                       "naming it (the requests get 503)")
    budget: float | None = option(None, help="a deployment carrying several nested budgets: the one a request runs "
                                  "at unless it asks ?budget=B (default: the one the model was trained for)")
    latency_target_ms: float | None = option(None, metavar="MS", help="a deployment carrying several budgets: "
                                             "requests that name no budget step to a smaller one while batches "
                                             "take longer than this at the ranks (the link slowed), and back up "
                                             "when they take under half of it (disco/serve/adapt.py)")
    inflight: int = option_of(RunOptions, "inflight")
    backend: str = option_of(RunOptions, "backend")
    threads: int | None = option(None, help="CPU threads per rank (default: cores / local ranks)")
    nnodes: int = option(1, help="hosts the ranks run on (several: this host runs rank 0; see --rdzv-endpoint)")
    rdzv_endpoint: str | None = option(None, metavar="HOST:PORT", help="with --nnodes above 1: where the hosts meet "
                                       "(this host's address and a free port); the other hosts run `torchrun "
                                       "--nnodes N --node-rank K --nproc-per-node 1 --rdzv-endpoint HOST:PORT "
                                       "--max-restarts K -m disco.runtime DEPLOY --serve` with the same --timeout "
                                       "and --inflight")
    model_code: str | None = option_of(RunOptions, "model_code")
    verify_key: str | None = option_of(RunOptions, "verify_key")
    verbose: bool = option_of(RunOptions, "verbose")

    def __post_init__(self) -> None:
        self.token = os.environ.get(TOKEN_ENV) if self.token is None else self.token
        if self.token is not None and not TOKEN.fullmatch(self.token):  # "" would turn authentication off
            raise DiscoError(f"--token (or ${TOKEN_ENV}) must be 8 or more printable ASCII characters without "
                             "spaces (what an HTTP header carries unchanged); leave both unset for no token")
        if not 0 < self.port < 65536:
            raise DiscoError(f"--port must be in 1..65535, got {self.port}")
        for flag, value, highest in (("--max-batch", self.max_batch, 4096), ("--queue-size", self.queue_size, 65536),
                                     ("--inflight", self.inflight, MAX_INFLIGHT), ("--top-k", self.top_k, 1000),
                                     ("--max-body-mb", self.max_body_mb, 1024), ("--max-pixels", self.max_pixels,
                                                                                 1_000_000_000)):
            if not (isinstance(value, (int, float)) and 0 < value <= highest):
                raise DiscoError(f"{flag} must be in (0, {highest}], got {value!r}")
        if self.max_decode_pixels is not None and not self.max_pixels <= self.max_decode_pixels <= 10**10:
            raise DiscoError(f"--max-decode-pixels must be in [--max-pixels, 1e10], got {self.max_decode_pixels}")
        check_budget(self.budget)
        if self.max_wait_ms < 0 or self.restarts < 0:
            raise DiscoError("--max-wait-ms and --restarts must not be negative")
        if self.latency_target_ms is not None and self.latency_target_ms <= 0:
            raise DiscoError("--latency-target-ms must be positive")
        if not (0 < self.header_timeout <= 3600 and 0 < self.body_timeout <= 3600):
            raise DiscoError("--header-timeout and --body-timeout must be in (0, 3600] seconds")
        if not 0 < self.timeout <= 3600 or not 0 <= self.max_wait_ms <= 60_000:
            raise DiscoError("--timeout must be in (0, 3600] seconds and --max-wait-ms in [0, 60000]")
        if self.nnodes < 1 or (self.nnodes > 1) != (self.rdzv_endpoint is not None):
            raise DiscoError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (and --rdzv-endpoint needs --nnodes)")

    @property
    def decode_pixels(self) -> int:
        return self.max_pixels if self.max_decode_pixels is None else self.max_decode_pixels

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MiB)

    @property
    def batch_timeout_s(self) -> float:
        """How long the front end waits for rank 0 to answer a batch before it calls rank 0 hung: rank 0 names a
        hung peer within --timeout of waiting on it, so twice that and a margin for the batch's compute."""
        return 2 * self.timeout + 5.0
