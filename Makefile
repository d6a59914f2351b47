# mhpfl-bench. `make test` and `make bench-smoke` install into .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch/torchvision: pip resolves them within the machine's cap (torch<=2.14.1 here).
TORCH_SPEC ?= torch torchvision

.PHONY: install test bench-smoke bench-time clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

bench-smoke: install
	$(BIN)/mhpfl run standalone --dataset fmnist --clients 10 --rounds 5 --train-fraction 0.1 --quiet --out runs/smoke/standalone
	$(BIN)/mhpfl run pfedlora --dataset fmnist --clients 10 --rounds 5 --train-fraction 0.1 --quiet --out runs/smoke/pfedlora
	$(BIN)/mhpfl compare runs/smoke/standalone runs/smoke/pfedlora

clean:
	rm -rf runs .pytest_cache .benchmarks

bench-time: install  ## round-time benchmarks (pytest-benchmark)
	$(BIN)/python -m pytest -q tests/test_benchmark_round.py --benchmark-enable
