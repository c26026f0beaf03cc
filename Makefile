# One command sets up and runs the tests (`make test`); one serves the bundled demo (`make demo`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL ?= 2
export TF_ENABLE_ONEDNN_OPTS ?= 0

.PHONY: venv test lint typecheck pytest demo bench fuzz overload soak clean

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# PyTorch's CPU build first (the default wheel pulls several GB of CUDA libraries)
	$(BIN)/python -m pip install -q --no-compile 'torch==2.13.0+cpu' || $(BIN)/python -m pip install -q --no-compile torch
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check studioserve tests bench wrappers
	$(BIN)/ruff format --check studioserve tests bench wrappers
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

# Two pytest-xdist workers (most tests wait on subprocesses, sockets and sshd), then the Ray
# tests on their own (marked in tests/conftest.py; exit 5: PYTEST_ARGS selected none of them).
# PYTEST_WORKERS=0 runs the first part in this process too.
PYTEST_WORKERS ?= 2
pytest: venv
	$(BIN)/pytest -n $(PYTEST_WORKERS) -m "not ray" $(PYTEST_ARGS)
	$(BIN)/pytest -m ray $(or $(PYTEST_ARGS),tests/rayserve) || [ $$? -eq 5 ]

test: lint typecheck pytest

demo: venv
	$(BIN)/studio demo

bench: venv
	$(BIN)/python bench/bench_pipe.py
	$(BIN)/python bench/bench_server.py

# The decoder fuzzing suite's long run (tests/wire/test_fuzz_decoders.py; `make test` runs it short).
fuzz: venv
	HYPOTHESIS_PROFILE=long $(BIN)/pytest tests/wire/test_fuzz_decoders.py -q -p no:cacheprovider --timeout=0

# Load shedding at 4x/10x/50x a slow model's capacity (~75 s), and the ten-minute soak of mixed
# valid and hostile traffic against the MLP (~11 min); both print PASS/FAIL per target.
overload: venv
	$(BIN)/python bench/bench_overload.py

soak: venv
	$(BIN)/python bench/bench_soak.py
bench-repository: venv
	$(BIN)/python bench/bench_repository.py
bench-frameworks: venv
	$(BIN)/python bench/bench_frameworks.py
bench-ray: venv
	$(BIN)/python bench/bench_ray.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
