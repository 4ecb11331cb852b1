# Two commands for a fresh machine: `make demo` and `make test`.
# TORCH picks the torch build: the CPU wheel by default; e.g. `make demo TORCH=torch` for CUDA.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.respmotion-installed

.PHONY: setup demo test bench bench-setup clean motion-reference model

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/respmotion demo --out out/demo

test: setup
	$(BIN)/python -m pytest -q -x tests

bench-setup: setup
	$(BIN)/pip install -q -e ".[test,bench]"

bench: bench-setup
	$(BIN)/python -m bench

# measured breathing-motion reference (DIR-Lab landmarks) shipped inside the package; docs/motion.md
DIRLAB ?= ../shared/data/dirlab-4dct-landmarks
motion-reference: setup
	$(BIN)/python -m respmotion.data.motion_reference_fit --data $(DIRLAB) \
		--out src/respmotion/data/motion_reference.json --plot docs/motion_reference.png --phantom 8

# the default motion model (synthesize without --model): for now the population prior alone, i.e. that JSON
model: motion-reference

clean:
	rm -rf out runs
