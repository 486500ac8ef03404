# Two entry points: `make demo` (set up, convert an example model) and `make test` (set up, run tests).
# Both create ./.venv once and install the versions in constraints.txt, known to pass the suite: a new
# upstream release cannot turn main red without a change here. `make test LOCK=` installs the newest
# releases the package's ranges allow instead; `make lock` refreshes constraints.txt from them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
LOCK ?= constraints.txt
PIN := $(if $(LOCK),-c $(LOCK))

.PHONY: setup demo test lock

$(BIN)/switchhead-rewrite: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIN) $(TORCH)
	$(BIN)/pip install -q $(PIN) -e ".[test]"
	touch $@

setup: $(BIN)/switchhead-rewrite

demo: setup
	$(BIN)/switchhead-rewrite examples/nanogpt.py --output switchhead_out --force

# pytest exits 5 when it collects no test: that fails the target like any other failure.
# Two pytest-xdist workers cut the suite from 10.9 to 6.1 min on the 2-core CI machine.
TEST_WORKERS ?= 2
# A compile cache of this checkout's own: Inductor's shared /tmp cache does not key on our ops'
# schemas, so code compiled by another checkout of another version could be reused.
test: setup
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.inductor-cache $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS)

# A fresh environment with the newest allowed releases, frozen into constraints.txt. Run the suite on
# it (`make test LOCK=` in a fresh clone) before committing the new file.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q $(TORCH)
	$(LOCK_VENV)/bin/pip install -q -e ".[test]"
	{ echo "# Versions known to pass 'make test' (Python 3.11, x86-64). Refresh: make lock, then make test."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^#'; } > constraints.txt
	rm -rf $(LOCK_VENV)
