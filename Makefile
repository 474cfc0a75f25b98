# phi3v — set-up and checks. `make demo` / `make test` on a fresh machine creates .venv, installs the pinned dependencies
# (constraints.txt: torch 2.13.0, CPU build here; never torchvision) and runs lint + the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.test-deps-stamp
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install browser demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,qlora]'
	@$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is not None)" \
		|| { echo "torchvision is installed in $(VENV): it breaks on CPU torch here; remove it"; exit 1; }
	@touch $(STAMP)

# What only the tests need: DeepSpeed, for the ZeRO-2 / ZeRO-3 runs on CPU (its source build imports torch: no build
# isolation, no prebuilt ops; it JIT-builds its CPU communication op on first use)
$(TEST_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		--no-build-isolation deepspeed
	@touch $(TEST_STAMP)

# The whole job on a drawn sample catalog, offline on a CPU: prepare, train, evaluate (runs/demo; `phi3v demo --help`)
demo: install
	$(BIN)/phi3v demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The browser test of `phi3v serve`'s page (tests/test_page.py) drives Debian's chromium through playwright (the dev
# extra). `make test` installs chromium when it is missing and this is root on Debian (about 20 s); elsewhere the test
# is skipped and says why. Not part of `make demo`.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's chromium for the browser test"; \
			{ DEBIAN_FRONTEND=noninteractive apt-get update -qq \
				&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
				|| echo "could not install chromium: the browser test will be skipped"; \
		else \
			echo "no chromium (and not root on Debian): the browser test will be skipped"; \
		fi; }

test: lint browser $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

format: install
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: install
	$(BIN)/python benchmarks/processor.py
	$(BIN)/python benchmarks/model.py
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/evaluate.py
	$(BIN)/python benchmarks/constrained.py
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
