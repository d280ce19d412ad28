# Two entry points on a fresh machine: `make demo` and `make test` (both create .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/disco inspect --model torchvision:resnet50 --nodes 2 --input-size 3,224,224
	$(BIN)/disco inspect --model torchvision:resnet50 --nodes 4 --input-size 3,224,224

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/accounting.py

clean:
	rm -rf $(VENV) build *.egg-info
