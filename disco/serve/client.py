"""A small client of `disco serve` (standard library only): wait until a service is ready, send it an image.
Used by `make demo` (disco.serve.demo), bench/serve.py and the tests."""
from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request

from disco.errors import DiscoError


def status_of(url: str, timeout: float = 5.0) -> int | None:
    """The HTTP status of GET `url`, or None when nothing answers there (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def wait_ready(base: str, process: subprocess.Popen | None = None, timeout: float = 300.0) -> float:
    """Seconds until `base`/ready answers 200. Fails at once when the service process ends or its /health says
    the ranks are gone for good."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if process is not None and process.poll() is not None:
            raise DiscoError(f"disco serve ended (exit code {process.returncode}) before it was ready")
        if status_of(f"{base}/ready") == 200:
            return time.monotonic() - began
        if status_of(f"{base}/health") == 503:
            raise DiscoError(f"the ranks of {base} ended before they were ready (see the service's errors)")
        time.sleep(0.2)
    raise DiscoError(f"{base} was not ready within {timeout:g} s")


def post_image(base: str, image: bytes, timeout: float = 60.0, **params) -> tuple[int, dict]:
    """POST an encoded image to /v1/predict: (status, JSON answer or error)."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    request = urllib.request.Request(f"{base}/v1/predict" + (f"?{query}" if query else ""), data=image,
                                     headers={"Content-Type": "application/octet-stream"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def interrupt(process: subprocess.Popen, timeout: float = 60.0) -> int:
    """Stop a `disco serve` process as Ctrl-C would (it stops its ranks first); killed if it takes longer."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
