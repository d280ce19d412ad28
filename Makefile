# Two entry points on a fresh machine: `make demo` and `make test` (both create .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_RUN := runs/demo
DEMO_DEPLOY := deploy/demo

.PHONY: install data browser demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package (offline); installed when missing and running as root.
data:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (tests needing it skip)"; fi; \
	fi

# The main job: how ResNet-50 splits, then a small DISCO model trained on Fashion-MNIST to 10x less traffic,
# exported and run on 2 local processes (accuracy and bytes per image next to the simulation's), then served over
# HTTP and sent a few of its test images.
demo: install data
	$(BIN)/disco inspect --model torchvision:resnet50 --nodes 2 --input-size 3,224,224
	$(BIN)/disco inspect --model torchvision:resnet50 --nodes 4 --input-size 3,224,224
	rm -rf $(DEMO_RUN)
	$(BIN)/disco train --model torchvision:mobilenet_v2 --model-kwargs width_mult=0.5 --stem-stride 1 \
	  --nodes 2 --budget 0.1 --dense-epochs 3 --epochs 1 --train-subset 10000 --test-subset 2000 --out $(DEMO_RUN)
	rm -rf $(DEMO_DEPLOY)
	$(BIN)/disco export $(DEMO_RUN) --out $(DEMO_DEPLOY)
	$(BIN)/disco run $(DEMO_DEPLOY) --eval
	$(BIN)/python -m disco.serve.demo $(DEMO_DEPLOY) --images 5

# Headless chromium for the test of `disco serve`'s page (Debian's packages); installed when missing and root.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
	  else echo "chromium is missing: run 'sudo apt-get install chromium chromium-driver' (the page tests skip)"; fi; \
	fi

test: install data browser
	@echo "make test: the whole suite, about 17 minutes on 2 CPU cores (pytest prints the time it took)"
	$(BIN)/python -m pytest -q

bench: install data
	$(BIN)/python bench/accounting.py
	$(BIN)/python bench/tradeoff.py
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) build *.egg-info
