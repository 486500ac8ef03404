# Two entry points: `make demo` (set up, convert an example model) and `make test` (set up, run tests).
# Both create ./.venv once; torch comes from the pinned CPU-machine release.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test

$(BIN)/switchhead-rewrite: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/switchhead-rewrite

demo: setup
	$(BIN)/switchhead-rewrite examples/nanogpt.py --output switchhead_out --force

# pytest exits 5 when it collects no test: that fails the target like any other failure.
# Two pytest-xdist workers cut the suite from 10.9 to 6.1 min on the 2-core CI machine.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS)
