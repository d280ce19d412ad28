"""Peak memory of `disco serve`'s front end under 32 concurrent maximal images (issue 30): small PNG files that
each declare 6300x6300 = 39.7 million pixels (under the default --max-pixels of 40 million), sent 32 at once, in
three kinds (8-bit RGB, 16-bit greyscale, RGBA). The front end's peak resident memory (VmHWM, reset between waves)
is measured with the default decoding budget (--max-decode-pixels = --max-pixels) and with a budget of 32 images
(what the front end did before it had one; RGB only, the others would need 15 GB). Beside each peak: the bound README states,
    idle + images x body + decode budget x 12 bytes.
Writes docs/results/serve_memory.{md,json}. Re-run:
    .venv/bin/python bench/serve_memory.py      # about 3 minutes on 2 CPU cores
"""
from __future__ import annotations

import io
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import serve as serve_bench  # noqa: E402  (bench/serve.py: the service process and its ImageNet preprocessing)
import disco  # noqa: E402
from disco.export import ModelSpec, export  # noqa: E402
from disco.models import build_for_data  # noqa: E402
from disco.serve.options import ServeOptions  # noqa: E402

WORK = ROOT / "runs" / "serve-memory"
RESULTS = ROOT / "docs" / "results"
SIDE, CONCURRENT = 6300, 32
BYTES_PER_PIXEL = 12  # the most a decode holds per pixel (16-bit greyscale on its way to 8-bit RGB)
MiB = 1 << 20


def deployment() -> Path:
    folder = WORK / "mobilenet_v2-n2"
    if not (folder / "manifest.json").is_file():
        torch.manual_seed(0)
        spec = ModelSpec(model="torchvision:mobilenet_v2", channels=3, classes=10, kwargs={"width_mult": 0.5})
        model = build_for_data(spec.model, channels=3, classes=10, width_mult=0.5).eval()
        example = torch.randn(1, 3, 64, 64)
        simulated = disco.partition(model, nodes=2, example_inputs=example).eval()
        export(simulated, folder, example_inputs=example, spec=spec, transport_dtype="fp32",
               preprocess={**serve_bench.IMAGENET, "size": [64, 64]})
    return folder


def maximal_images() -> dict[str, bytes]:
    """Gradients: a few hundred KB as PNG, 39.7 million pixels once decoded."""
    ramp = np.linspace(0, 1, SIDE, dtype=np.float32)[None, :]
    rgb = np.broadcast_to((ramp * 255).astype(np.uint8)[..., None], (SIDE, SIDE, 3))
    arrays = {"RGB 8-bit": rgb, "greyscale 16-bit": np.broadcast_to((ramp * 65535).astype(np.uint16), (SIDE, SIDE)),
              "RGBA 8-bit": np.dstack([rgb, rgb[..., :1]])}
    encoded = {}
    for kind, array in arrays.items():
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
        encoded[kind] = buffer.getvalue()
    return encoded


def _status_kib(pid: int, field: str) -> int:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def wave(service: serve_bench.Service, image: bytes) -> tuple[float, list[int]]:
    """Peak front-end memory (MiB) while CONCURRENT copies of `image` are answered, and their status codes."""
    pid = service.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current resident size
    with httpx.Client(base_url=service.url, timeout=600) as client, ThreadPoolExecutor(CONCURRENT) as pool:
        statuses = list(pool.map(lambda _: client.post("/v1/predict", content=image).status_code,
                                 range(CONCURRENT)))
    return _status_kib(pid, "VmHWM") / 1024, statuses


def measure(folder: Path, decode_pixels: int | None, images: dict[str, bytes], port: int) -> dict:
    extra = [] if decode_pixels is None else ["--max-decode-pixels", str(decode_pixels)]
    service = serve_bench.Service(folder, port, "--queue-size", str(CONCURRENT), *extra)
    try:
        service.wait_ready()
        time.sleep(1)
        idle = _status_kib(service.process.pid, "VmRSS") / 1024
        options = ServeOptions(deploy=str(folder), max_decode_pixels=decode_pixels)
        bound = idle + (CONCURRENT * max(map(len, images.values())) + options.decode_pixels * BYTES_PER_PIXEL) / MiB
        rows = {}
        for kind, image in images.items() if decode_pixels is None else list(images.items())[:1]:
            peak, statuses = wave(service, image)
            rows[kind] = {"peak_mib": round(peak), "statuses": sorted(set(statuses))}
            print(f"decode budget {options.decode_pixels:,} px, {kind}: peak {peak:.0f} MiB (idle {idle:.0f}, "
                  f"bound {bound:.0f}), answers {sorted(set(statuses))}", flush=True)
        return {"decode_pixels": options.decode_pixels, "idle_mib": round(idle), "bound_mib": round(bound),
                "waves": rows}
    finally:
        service.stop()


def render(results: list[dict]) -> str:
    lines = ["# Front-end memory under 32 concurrent maximal images", "",
             f"{CONCURRENT} concurrent POST /v1/predict, each a PNG declaring {SIDE}x{SIDE} = {SIDE * SIDE:,} pixels; "
             "peak resident memory (VmHWM) of the `disco serve` process (ranks not included), a 2-node "
             "mobilenet_v2 deployment. Bound = idle + 32 x body + decode budget x 12 bytes.", "",
             "| decode budget (pixels) | image | idle MiB | peak MiB | bound MiB | answers |", "|---|---|---|---|---|---|"]
    for result in results:
        for kind, row in result["waves"].items():
            lines.append(f"| {result['decode_pixels']:,} | {kind} | {result['idle_mib']} | {row['peak_mib']} | "
                         f"{result['bound_mib']} | {row['statuses']} |")
    lines += ["", "Re-run: `.venv/bin/python bench/serve_memory.py`"]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    for folder in (WORK, serve_bench.WORK):  # the service's log goes to bench/serve.py's folder
        folder.mkdir(parents=True, exist_ok=True)
    folder, images = deployment(), maximal_images()
    results = [measure(folder, budget, images, _free_port()) for budget in (None, CONCURRENT * SIDE * SIDE)]
    RESULTS.joinpath("serve_memory.json").write_text(json.dumps(results, indent=1) + "\n")
    RESULTS.joinpath("serve_memory.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
