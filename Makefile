# Two commands do everything: `make test` and (from the serving issue on) `make serve`.
# Each installs what it needs first: a .venv with the project and its dev tools, and redis-server.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines take the CPU build of torch (pip finds it on this machine's disk); a GPU machine
# keeps whatever CUDA build the user installed.
TORCH_CPU := torch==2.13.0

.PHONY: setup serve loadtest chaos soak test lint typecheck layers pytest clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q $(TORCH_CPU); fi
	$(BIN)/pip install -q -e '.[dev]'
	command -v redis-server >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq redis-server)
	touch $(STAMP)

# The served demo on the bundled tiny models: Ray, Redis and the OpenAI-compatible API on :8000.
serve: setup
	$(BIN)/covspec serve --config deploy/local.yaml

# Load test of a running server (make serve): headless Locust, CSV + HTML + a summary table.
LOADTEST_USERS ?= 8
LOADTEST_TIME ?= 60s
LOADTEST_HOST ?= http://127.0.0.1:8000
COVSPEC_API_KEYS ?= sk-demo-alice,sk-demo-bob,sk-demo-carol,sk-demo-dave
loadtest: setup
	mkdir -p loadtest/results
	COVSPEC_API_KEYS=$(COVSPEC_API_KEYS) $(BIN)/locust -f loadtest/locustfile.py --headless \
		-H $(LOADTEST_HOST) -u $(LOADTEST_USERS) -r 2 -t $(LOADTEST_TIME) \
		--csv loadtest/results/run --html loadtest/results/run.html --only-summary
	$(BIN)/python -m loadtest.summary loadtest/results/run | tee loadtest/results/summary.md

# Reliability scenarios, each against its own `covspec serve` (loadtest/README.md): the short ones
# (fairness, overload, replica kills, Redis faults, fuzzing; about 13 minutes), and the 20-minute soak.
chaos: setup
	$(BIN)/python -m loadtest.scenarios chaos

soak: setup
	$(BIN)/python -m loadtest.scenarios soak

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy core scheduler kvcache

layers: setup
	$(BIN)/lint-imports

pytest: setup
	$(BIN)/pytest

test: lint typecheck layers pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
