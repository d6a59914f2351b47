# mhpfl-bench. `make test` and `make bench-smoke` install into .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch/torchvision: pip resolves them within the machine's cap (torch<=2.14.1 here).
# The optional extras ray and flower are installed too, so that their tests run (make test, CI).
TORCH_SPEC ?= torch torchvision
# Where torch comes from. Default: pip's index (on Linux: the CUDA build, ~6 GB with its CUDA
# wheels). On a CPU-only machine: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install test bench-smoke bench bench-full bench-paper report check bench-time clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev,ray,flower]'
	$(BIN)/python -m compileall -q mhpfl  # bytecode, as pip compiles a regular install
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# Two short runs with a progress bar each (a rerun says "already finished"; --force redoes them).
bench-smoke: install
	$(BIN)/mhpfl run standalone --dataset fmnist --clients 10 --rounds 5 --train-fraction 0.1 --out runs/smoke/standalone
	$(BIN)/mhpfl run pfedlora --dataset fmnist --clients 10 --rounds 5 --train-fraction 0.1 --out runs/smoke/pfedlora
	$(BIN)/mhpfl compare runs/smoke/standalone runs/smoke/pfedlora

# The quick suite (CPU; 30 runs: every method on the N10 setting, 3 seeds, converged; 24-29
# minutes on 2 AVX-512 AMD EPYC cores, 27-36 on 2 Intel Xeon ones, 27.6 on AVX2 ones, 47.4 on a
# slower AVX2 machine before FedKD's faster SVD) and its report into results/quick/. Finished
# runs are cached there: rerunning trains nothing. BENCH_ARGS e.g. "--jobs 2" or "--force".
BENCH_ARGS ?=
bench: install
	$(BIN)/mhpfl bench quick --out results/quick $(BENCH_ARGS)

# The full CPU suite (144 runs: the N10, N50, N100 and homogeneous settings and the pFedLoRA
# ablation, 3 seeds; about 4.3 hours on 2 cores) into results/full/.
bench-full: install
	$(BIN)/mhpfl bench full --out results/full $(BENCH_ARGS)

# The paper's protocol (CIFAR-10/100, 500 rounds): meant for a GPU; PAPER_DEVICE=cpu to force CPU.
PAPER_DEVICE ?= $(shell test -x $(BIN)/python && $(BIN)/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
bench-paper: install
	$(BIN)/mhpfl bench paper --out results/paper --device $(PAPER_DEVICE) $(BENCH_ARGS)

# Tables and plots again from finished runs (DIR=results/quick by default).
DIR ?= results/quick
report: install
	$(BIN)/mhpfl report $(DIR)

# Regression check: reruns the smoke suite, compares with results/smoke/reference.json.
CHECK_ARGS ?=
check: install
	$(BIN)/mhpfl check --quiet $(CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache .benchmarks

bench-time: install  ## round-time benchmarks (pytest-benchmark)
	$(BIN)/python -m pytest -q benchmarks --benchmark-enable
