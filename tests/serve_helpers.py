"""Helpers for `disco serve` tests: start the service on a free port, wait until it is ready, find its ranks; a
stand-in Service for tests of the HTTP layer alone."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx

from disco.errors import DiscoError
from disco.serve.client import interrupt, wait_ready
from disco.serve.local_ranks import local_children
from disco.serve.metrics import ServiceMetrics
from runtime_helpers import free_port


class Served:
    def __init__(self, folder: Path, *args: str, token: str | None = None, log: Path):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("DISCO_SERVE_TOKEN", None)
        command = [sys.executable, "-m", "disco", "serve", str(folder), "--port", str(self.port), *args]
        if token:
            command += ["--token", token]
        with open(log, "w") as stderr:  # a file, not a pipe: nobody has to read it for the service to go on
            self.process = subprocess.Popen(command, env=env, stderr=stderr, stdout=subprocess.DEVNULL, text=True)
        self.client = httpx.Client(base_url=self.url, timeout=120,
                                   headers={"Authorization": f"Bearer {token}"} if token else {})

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds until /ready answered 200."""
        try:
            return wait_ready(self.url, self.process, timeout)
        except DiscoError as error:
            raise AssertionError(f"{error}: {self.log.read_text()}") from None

    def ranks(self) -> list[int]:
        """The rank processes (children of torchrun, the child of `disco serve`), oldest first."""
        return sorted(pid for torchrun in local_children(self.process.pid) for pid in local_children(torchrun))

    def predict(self, image: bytes, **params):
        return self.client.post("/v1/predict", content=image, params=params,
                                headers={"Content-Type": "image/png"})

    def stop(self) -> str:
        """Interrupt the service as Ctrl-C would; its stderr."""
        self.client.close()
        interrupt(self.process)
        return self.log.read_text()


def stub_service(token: str | None = None) -> SimpleNamespace:
    """What `create_app` and the routes that need no model read of a Service: no deployment, no ranks (ready)."""
    return SimpleNamespace(options=SimpleNamespace(token=token, top_k=5, max_body_bytes=1024, max_pixels=10**6),
                           metrics=ServiceMetrics(), lifespan=None, model_card=lambda: {"task": "classification"},
                           level_of=lambda budget: 0,
                           ranks=SimpleNamespace(ended=False, ready=True, reason=""), manifest=SimpleNamespace(nodes=2))


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def browser():
    """Headless Debian chromium driven by selenium (no download: the driver is the packaged one); None when either
    is missing (`make test` installs them when it runs as root)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def upload_in_page(driver, url: str, image: Path, token: str | None = None, timeout: float = 60):
    """Open the service's page, type the token, upload `image`, and wait until the answer is drawn."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    if token:
        driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "error").text or d.find_elements(By.ID, "text"))
    return driver
