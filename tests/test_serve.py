"""`disco serve` over real HTTP: every endpoint, answers equal to `disco run` on the same image files, batching,
bad requests, the token, overload, and ranks that die or hang (the service says so, restarts them, and answers
correctly again)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from runtime_helpers import disco_cli, make_deployment
from serve_helpers import CHROMEDRIVER, CHROMIUM, Served, browser, stub_service, upload_in_page

TOKEN = "s3cret-token"
CLASSES = [f"class {i}" for i in range(10)]
PREPROCESS = {"channels": 3, "size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, bytes]:
    """Image files of other sizes and modes than the model's 32x32 RGB (the service resizes and converts them)."""
    rng = np.random.default_rng(0)
    made = {"colour.png": _png(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
            "grey.png": _png(rng.integers(0, 256, (32, 32), dtype=np.uint8)),
            "alpha.png": _png(rng.integers(0, 256, (64, 48, 4), dtype=np.uint8)),
            "small.png": _png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))}
    return made


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    return make_deployment(tmp_path_factory.mktemp("served"), "mobilenet_v2", 2, preprocess=PREPROCESS,
                           class_names=CLASSES)


@pytest.fixture(scope="module")
def served(deployment, tmp_path_factory):
    """One service for the whole module (starting one takes seconds): the fault tests at the end of this file run
    last, in file order; the first uses its one restart, the second leaves it without ranks for good."""
    service = Served(deployment.folder, "--max-wait-ms", "50", "--timeout", "3", "--restarts", "1", "--max-pixels",
                     "1000000", "--max-body-mb", "2", "--queue-size", "12", "--max-batch", "4", token=TOKEN,
                     log=tmp_path_factory.mktemp("log") / "serve.log")
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def reference(deployment, images, tmp_path_factory) -> dict[str, dict]:
    """`disco run --input` on the same files: the answers the service must give."""
    folder = tmp_path_factory.mktemp("inputs")
    for name, data in images.items():
        (folder / name).write_bytes(data)
    summary = folder / "summary.json"
    result = disco_cli("run", str(deployment.folder), "--input", str(folder), "--summary", str(summary))
    assert result.returncode == 0, result.stderr
    return {p["input"]: p for p in json.loads(summary.read_text())["predictions"]}


def _assert_same_answer(answer: dict, expected: dict) -> None:
    assert answer["top"][0]["class"] == expected["class"] and answer["top"][0]["label"] == expected["label"]
    assert answer["top"][0]["probability"] == pytest.approx(expected["probability"], rel=1e-4, abs=1e-6)


def test_health_ready_and_model_card(served, deployment):
    assert served.client.get("/health").json() == {"status": "up"}
    assert served.client.get("/ready").json() == {"ready": True, "nodes": 2}
    card = served.client.get("/v1/model").json()
    assert (card["task"], card["nodes"], card["input_shape"], card["class_names"]) == \
        ("classification", 2, [3, 32, 32], CLASSES)
    assert card["bytes_per_image"] == deployment.costs.traffic.bytes
    assert card["cost_report"]["bytes_matrix"] == deployment.costs.traffic.bytes_matrix


def test_answers_equal_disco_run_on_the_same_files(served, images, reference):
    for name, data in images.items():
        response = served.predict(data)
        assert response.status_code == 200, response.text
        _assert_same_answer(response.json(), reference[name])
    multipart = served.client.post("/v1/predict", files={"image": ("x.png", images["colour.png"], "image/png")},
                                   params={"top_k": 3})
    assert multipart.status_code == 200 and len(multipart.json()["top"]) == 3
    _assert_same_answer(multipart.json(), reference["colour.png"])
    probabilities = [entry["probability"] for entry in multipart.json()["top"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert multipart.json()["input"] == {"size": [50, 40], "mode": "RGB",
                                         "model_input": {"channels": 3, "size": [32, 32]}}


def _metric(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" ([0-9.e+]+)"
    match = re.search(pattern, text)
    assert match, f"{name} {labels} not in /metrics"
    return float(match.group(1))


def test_concurrent_requests_are_batched_and_all_answered(served, images, reference):
    before = served.client.get("/metrics").text
    names = list(images) * 3
    with ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(lambda name: served.predict(images[name]), names))
    assert [r.status_code for r in responses] == [200] * len(names)
    for name, response in zip(names, responses):
        _assert_same_answer(response.json(), reference[name])
    after = served.client.get("/metrics").text
    batches = _metric(after, "disco_batch_size_count") - _metric(before, "disco_batch_size_count")
    images_run = _metric(after, "disco_batch_size_sum") - _metric(before, "disco_batch_size_sum")
    assert images_run == len(names) and batches < len(names)  # 12 requests at once: some shared a batch


def test_metrics_count_requests_errors_and_the_bytes_each_rank_sent(served, images, deployment):
    served.predict(images["grey.png"])
    served.predict(b"not an image")
    time.sleep(2.5)  # rank 0 gathers every rank's counters at most once a second, between batches
    text = served.client.get("/metrics").text
    assert _metric(text, "disco_requests_total", path="/v1/predict", status="200") >= 1
    assert _metric(text, "disco_errors_total", kind="not_an_image") >= 1
    assert _metric(text, "disco_ready") == 1
    images_run = _metric(text, "disco_batch_size_sum")
    matrix = deployment.costs.traffic.bytes_matrix
    for src, dst in ((0, 1), (1, 0)):
        sent = _metric(text, "disco_bytes_sent_total", category="activations", dst=dst, src=src)
        assert sent == matrix[src][dst] * images_run


@pytest.mark.parametrize("body, status, kind", [
    (b"", 400, "empty"),
    (b"GIF89a but not really an image", 415, "not_an_image"),
    (_png(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:6000], 422, "unreadable_image"),
    (_png(np.zeros((3000, 3000), dtype=np.uint8)), 413, "too_many_pixels"),
    (b"x" * (3 * 1024 * 1024), 413, "too_large"),
])
def test_bad_requests_get_a_json_error_saying_what_is_wrong(served, body, status, kind):
    response = served.client.post("/v1/predict", content=body, headers={"Content-Type": "image/png"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["kind"] == kind and response.json()["error"]["message"]


def test_wrong_method_path_query_and_token(served, images):
    assert served.client.get("/v1/predict").status_code == 405
    assert served.client.get("/v2/nothing").status_code == 404
    invalid = served.predict(images["grey.png"], top_k=0)
    assert invalid.status_code == 422 and invalid.json()["error"]["kind"] == "invalid_request"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        refused = served.client.post("/v1/predict", content=images["grey.png"],
                                     headers={**headers, "Authorization": headers.get("Authorization", "")})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert served.client.get("/metrics", headers={"Authorization": ""}).status_code == 401
    assert served.client.get("/health", headers={"Authorization": ""}).status_code == 200  # probes need no token
    assert "<title>DISCO</title>" in served.client.get("/", headers={"Authorization": ""}).text


def _path_labels(text: str) -> dict[str, float]:
    """{path label: requests counted under it, all statuses} from a /metrics text."""
    counted: dict[str, float] = {}
    for path, count in re.findall(r'disco_requests_total\{path="([^"]*)",status="\d+"\} ([0-9.e+]+)', text):
        counted[path] = counted.get(path, 0) + float(count)
    return counted


def test_every_route_is_counted_under_its_path_and_any_other_url_under_one_label():
    from fastapi.testclient import TestClient

    from disco.serve.app import create_app

    service = stub_service()
    client = TestClient(create_app(service))
    routes = {*client.app.openapi()["paths"], client.app.openapi_url}
    assert routes >= {"/", "/health", "/ready", "/v1/model", "/v1/predict", "/metrics"}
    for path in routes:
        client.get(path)  # POST-only /v1/predict: 405, still its own label
    client.get("/v2/scan/0")
    series = service.metrics.exposition().decode().count("disco_requests_total{")
    for i in range(1, 200):
        assert client.get(f"/v2/scan/{i}", params={"q": i}).json()["error"]["kind"] == "not_found"
    counted = _path_labels(service.metrics.exposition().decode())
    assert counted == {**{path: 1 for path in routes}, "other": 200}
    assert service.metrics.exposition().decode().count("disco_requests_total{") == series  # no new series


def test_the_token_guards_v1_and_metrics_in_process():
    from fastapi.testclient import TestClient

    from disco.serve.app import create_app

    service = stub_service(token=TOKEN)
    client = TestClient(create_app(service))
    for path in ("/v1/model", "/v1/anything", "/metrics"):
        refused = client.get(path, headers={"Authorization": "Bearer wrong"})
        assert (refused.status_code, refused.headers["www-authenticate"]) == (401, "Bearer")
        assert refused.json() == {"error": {"kind": "unauthorized",
                                            "message": "this service needs `Authorization: Bearer TOKEN`"}}
    for path in ("/", "/health", "/ready"):
        assert client.get(path).status_code == 200
    assert client.head("/health").status_code == 200  # load balancers' probes
    assert client.get("/openapi.json").status_code == 401  # what the API offers is as protected as the API
    assert client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).json() == service.model_card()
    assert _metric(service.metrics.exposition().decode(), "disco_errors_total", kind="unauthorized") == 4  # + openapi
    assert _path_labels(service.metrics.exposition().decode())["other"] == 1  # /v1/anything: refused, one label
    assert TestClient(create_app(stub_service())).get("/v1/model").status_code == 200  # no --token: no check


def test_a_route_with_parameters_is_labelled_by_its_template():
    from fastapi.routing import APIRoute

    from disco.serve.middleware import PathLabels

    labels = PathLabels([APIRoute("/v2/models/{name}/infer", lambda name: None, methods=["POST"]),
                         APIRoute("/v2/health/live", lambda: None)])
    assert labels("/v2/models/a/infer") == labels("/v2/models/b/infer") == "/v2/models/{name}/infer"
    assert labels("/v2/health/live") == "/v2/health/live"
    assert labels("/v2/models/a/b/infer") == labels("/v2") == "other"


@pytest.fixture(scope="module")
def chromium():
    driver = browser()
    if driver is None:
        pytest.skip(f"the page test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                    "`make test` installs them when run as root")
    yield driver
    driver.quit()


def test_the_page_uploads_an_image_and_draws_the_answer(served, images, reference, chromium, tmp_path):
    from selenium.webdriver.common.by import By

    picture = tmp_path / "colour.png"
    picture.write_bytes(images["colour.png"])
    upload_in_page(chromium, served.url, picture, token=TOKEN)
    assert chromium.find_element(By.ID, "error").text == ""
    bars = chromium.find_elements(By.CSS_SELECTOR, ".bar")
    assert len(bars) == 5
    expected = reference["colour.png"]
    assert bars[0].get_attribute("data-label") == expected["label"]
    assert float(bars[0].get_attribute("data-probability")) == pytest.approx(expected["probability"], rel=1e-4)
    assert expected["label"] in chromium.find_element(By.ID, "text").text
    assert "split across 2 nodes" in chromium.find_element(By.ID, "figures").text
    assert chromium.execute_script("return document.getElementById('picture').width") >= 224  # the image drawn


def test_overload_is_refused_with_retry_after(served, images):
    with ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(lambda _: served.predict(images["colour.png"]), range(96)))
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 503} and 503 in statuses and 200 in statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["error"]["kind"] == "overloaded" and refused.headers["retry-after"] == "1"


def _load_while(served, image: bytes, expected: dict, fault, seconds: float = 7.0) -> dict[str, int]:
    """Requests from 4 clients while `fault` happens: each answered correctly or refused with a reason naming a
    rank or readiness; none hangs (the client's own timeout would raise)."""
    counts = {"correct": 0, "refused": 0}
    stop = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop:
            response = served.predict(image)
            if response.status_code == 200:
                _assert_same_answer(response.json(), expected)
                counts["correct"] += 1
            else:
                assert response.status_code == 503, response.text
                error = response.json()["error"]
                assert error["kind"] in ("rank_failed", "not_ready", "overloaded")
                assert error["kind"] != "rank_failed" or "rank" in error["message"]
                counts["refused"] += 1
                time.sleep(0.2)

    with ThreadPoolExecutor(5) as pool:
        clients = [pool.submit(client) for _ in range(4)]
        time.sleep(2.0)
        fault()
        for future in clients:
            future.result(timeout=120)
    return counts


# the two tests below end the module's service: they run last (file order)
def _rank_link(rank0: int) -> tuple[str, int]:
    """The address rank 0 reaches the front end at (in its environment), as any local process could read it."""
    entry = next(entry for entry in Path(f"/proc/{rank0}/environ").read_bytes().split(b"\0")
                 if entry.startswith(b"DISCO_SERVE_LINK="))
    host, _, port = entry.split(b"=", 1)[1].decode().rpartition(":")
    return host, int(port)


def test_a_dead_rank_fails_requests_naming_it_then_the_ranks_restart(served, images, reference):
    rank0, rank1 = served.ranks()[:2]
    link = _rank_link(rank0)  # hostile local connections first: they must not stop the restarted rank 0 joining
    for _ in range(100):
        socket.create_connection(link).close()
    silent = [socket.create_connection(link) for _ in range(10)]
    counts = _load_while(served, images["colour.png"], reference["colour.png"], lambda: os.kill(rank1, signal.SIGKILL))
    assert counts["correct"] > 0 and counts["refused"] > 0
    # named by whichever sees it first: the front end (rank 1's process ended) or rank 0 (its peer is gone)
    assert re.search(r"not ready: .*(rank 1 \(pid \d+, on this host\) ended|lost the connection to rank 1)",
                     served.log.read_text()), served.log.read_text()
    served.wait_ready(timeout=90)
    answer = served.predict(images["colour.png"])
    assert answer.status_code == 200
    _assert_same_answer(answer.json(), reference["colour.png"])
    assert rank1 not in served.ranks()  # restarted: new processes
    for connection in silent:
        connection.close()


def test_a_hung_rank_0_is_named_and_without_restarts_left_health_says_so(served, images):
    began = time.monotonic()
    os.kill(served.ranks()[0], signal.SIGSTOP)
    response = served.predict(images["grey.png"])
    assert response.status_code == 503 and "rank 0" in response.json()["error"]["message"]
    assert time.monotonic() - began < 3 * 3 + 5  # within the timeout (3 s), with room for a loaded machine
    deadline = time.monotonic() + 60  # its one restart was used above: the ranks do not come back
    while served.client.get("/health").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    health = served.client.get("/health")
    assert health.status_code == 503 and "restart `disco serve`" in health.json()["error"]["message"]
    refused = served.predict(images["grey.png"])
    assert refused.status_code == 503 and refused.json()["error"]["kind"] == "not_ready"


def test_sigterm_stops_the_service_saying_so(served):
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(60) == 0
    assert served.log.read_text().rstrip().endswith("disco serve: stopped")
