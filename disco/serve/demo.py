"""The end of `make demo`: start `disco serve` on a deployment, send it a few of the test images its training run
scored (as PNG files over HTTP, as any client would), print each answer next to the true label, and stop it.

    python -m disco.serve.demo deploy/demo [--images 5] [--port 8000]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import urllib.request

import torch
from PIL import Image

from disco.tasks.data import load_task_data
from disco.errors import DiscoError
from disco.export.manifest import Manifest
from disco.serve.client import interrupt, post_image, wait_ready

READY_TIMEOUT_S = 300


def test_pictures(manifest: Manifest, count: int) -> list[tuple[bytes, object]]:
    """The first `count` test images of the deployment's dataset as PNG bytes (normalisation undone), with their
    targets."""
    if manifest.dataset is None or manifest.preprocess is None:
        raise DiscoError("the deployment records no dataset: export it from a training run")
    d, p = manifest.dataset, manifest.preprocess
    data = load_task_data(manifest.task, d["dataset"], d["data"], seed=d.get("seed", 0), test_size=count,
                          image_size=d["image_size"])
    pictures = []
    for index in range(min(count, len(data.test))):
        image, target = data.test[index]
        pixels = image * torch.tensor(p["std"])[:, None, None] + torch.tensor(p["mean"])[:, None, None]
        pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
        picture = Image.fromarray(pixels[0].numpy(), "L") if pixels.shape[0] == 1 else \
            Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        pictures.append((buffer.getvalue(), target))
    return pictures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disco.serve.demo", description=__doc__.splitlines()[0])
    parser.add_argument("deploy", help="deployment folder (exported from a training run)")
    parser.add_argument("--images", type=int, default=5, help="test images to send (default: 5)")
    parser.add_argument("--port", type=int, default=8000, help="port to serve on, on 127.0.0.1 (default: 8000)")
    args = parser.parse_args(argv)
    manifest = Manifest.load(args.deploy)
    pictures = test_pictures(manifest, args.images)
    url = f"http://127.0.0.1:{args.port}"
    service = subprocess.Popen([sys.executable, "-m", "disco", "serve", args.deploy, "--port", str(args.port)],
                               env=dict(os.environ))
    try:
        wait_ready(url, service, READY_TIMEOUT_S)
        for index, (png, target) in enumerate(pictures):
            status, answer = post_image(url, png)
            if isinstance(target, torch.Tensor) and target.dim() == 0:
                target = int(target)
            truth = manifest.class_names[target] if isinstance(target, int) and manifest.class_names else target
            said = answer.get("text") if status == 200 else f"error {answer['error']}"
            print(f"POST /v1/predict test image {index} ({len(png)} bytes of PNG, true: {truth}) -> {said}")
        with urllib.request.urlopen(f"{url}/v1/model", timeout=10) as response:
            card = json.loads(response.read())
        print(f"served by {card['nodes']} processes; {card['bytes_per_image']:,} bytes per image cross the network")
    finally:
        interrupt(service)
    return 0


if __name__ == "__main__":
    sys.exit(main())
